"""A shipped shapes-world customization workflow run in a real ComfyUI and measured: does the generated
`sks mtn` clip show the case's subject on the case's path?

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/world_workflow.py --out out/world_workflow [--workflow 11]

ComfyUI is started with --cpu on a fresh base directory inside --out; the workflow is queued once per
sampling seed (training runs once, ComfyUI caches it) and each saved video is measured against the case
chosen in its Shapes World Example Data node, with the benchmark's measurements. `--set NODE.INPUT=VALUE`
changes one input of the workflow's API form first (e.g. `--set 28.seed=0` for other preservation clips,
`--set 7.learning_rate=0.0005`); values are read as JSON, else kept as text. Writes world_workflow.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

COLUMNS = ("colour_match", "colour_distance", "shape_iou", "texture_correlation", "path_shape_error",
           "direction_cosine", "speed_ratio")


def _override(text: str) -> tuple[str, str, object]:
    target, _, raw = text.partition("=")
    node, _, name = target.partition(".")
    if not (node and name and raw):
        raise SystemExit(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. 28.seed=0")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node, name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workflow", default="01",
                        help="the shipped workflow's number: 01 (subject and motion LoRAs, the default), 11 (DualReal)")
    parser.add_argument("--seeds", default="0,1,2,3", help="sampling seeds, comma-separated")
    parser.add_argument("--set", action="append", default=[], type=_override, dest="overrides",
                        metavar="NODE.INPUT=VALUE")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")

    from comfy_host import running_server
    from workflow_api import inputs_of, to_api

    from custvid_core.media import read_video
    from custvid_core.world.bench.customization import mean_over_rows, measure, subject_references
    from custvid_core.world.cases import load_cases

    (workflow,) = (REPO / "workflows").glob(f"{args.workflow} *.json")
    out = Path(args.out)
    base = out / "comfy_base"
    shutil.rmtree(base, ignore_errors=True)  # no checkpoint of an earlier run to resume
    base.mkdir(parents=True)
    rows = []
    with running_server(base) as server:
        prompt = to_api(json.loads(workflow.read_text()), server.object_info())
        for node, name, value in args.overrides:
            if node not in prompt:
                raise SystemExit(f"--set: the workflow has no node {node}")
            prompt[node]["inputs"][name] = value
        case_name = next(n["inputs"]["case"] for n in prompt.values()
                         if n["class_type"] == "CustVid_WorldCaseData")  # several clips, one case
        case = {c.name: c for c in load_cases()}[case_name]
        references = subject_references(case)
        scale = int(inputs_of(prompt, "ImageScaleBy")["scale_by"])
        for seed in (int(s) for s in args.seeds.split(",")):
            inputs_of(prompt, "KSampler")["seed"] = seed
            inputs_of(prompt, "SaveVideo")["filename_prefix"] = f"custvid/seed{seed}"
            result = server.run(prompt, timeout=3600)
            if not result["ok"]:
                raise SystemExit(f"the workflow failed: {result['error']}")
            video = sorted((base / "output" / "custvid").glob(f"seed{seed}_*"))[-1]
            frames = read_video(video)[:, ::scale, ::scale]  # back to the world's size (nearest upscale)
            measured = measure(case, frames, references)
            row = {"seed": seed, **{k: measured[k] for k in COLUMNS}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    average = {k: mean_over_rows(rows, k) for k in COLUMNS}
    result = {"workflow": workflow.name, "case": case_name, "overrides": [list(o) for o in args.overrides],
              "seeds": [r["seed"] for r in rows], "rows": rows, "average": average}
    (out / "world_workflow.json").write_text(json.dumps(result, indent=2))
    (out / "world_workflow.md").write_text(
        f"| {' | '.join(COLUMNS)} |\n|{' --- |' * len(COLUMNS)}\n| {' | '.join(f'{average[k]:.3f}' for k in COLUMNS)} |\n")
    print(json.dumps(average, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
