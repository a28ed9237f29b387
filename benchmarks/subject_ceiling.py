"""How much of an unseen subject can a subject LoRA teach the shapes world at all?

    python benchmarks/subject_ceiling.py --out out/subject_ceiling [--seeds 0,1,2,3] [--threads 1]

For each default case, three ways of drawing the case's subject are generated with no motion LoRA and
measured with the benchmark's subject columns:
- `base`: the world prompted with the case's own words ("orange star");
- `full_subject`: the subject LoRA of the benchmark's `full_still_hue` rung, prompted "sks";
- `unrestricted_subject`: a subject LoRA with nothing held back, the upper end of what LoRA fine-tuning can
  teach this world: all ten roles at rank 32, the plain loss over the whole photo, no preservation, alignment,
  token attention or stillness LoRA, and three times the steps, prompted "sks";
- `full_subject_embedding`, `unrestricted_subject_embedding`: the same two with a trigger embedding learned
  alongside (SynMotion's subject embedding).
`--variants` picks some of these. Writes subject_ceiling.json and subject_ceiling.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("base", "full_subject", "unrestricted_subject", "full_subject_embedding",
            "unrestricted_subject_embedding")
COLUMNS = ("colour_match", "colour_distance", "shape_match", "shape_iou", "texture_correlation", "present")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2,3", help="sampling seeds, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, some of: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: some of {', '.join(VARIANTS)}")

    import torch

    from custvid_core.representations.subject import load_dinov2
    from custvid_core.training.customize import train_subject
    from custvid_core.world.bench.customization import mean_over_rows, measure, subject_references
    from custvid_core.world.bench.methods import lora_methods
    from custvid_core.world.cases import DEFAULT_CASES, load_cases
    from custvid_core.world.customize import SUBJECT_WORD, generate_with_loras, subject_set
    from custvid_core.world.encoders import DINO_FILE
    from custvid_core.world.model import load_world
    from custvid_core.world.sample import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world()
    dino = load_dinov2(DINO_FILE)
    methods = lora_methods()
    full = methods["full_still_hue"].subject
    unrestricted = replace(methods["unrestricted_subject_embedding"].subject, trigger_embedding=False)
    settings_of = {"full_subject": full, "unrestricted_subject": unrestricted,
                   "full_subject_embedding": replace(full, trigger_embedding=True),
                   "unrestricted_subject_embedding": replace(unrestricted, trigger_embedding=True)}
    rows = []
    for case in load_cases(DEFAULT_CASES):
        references = subject_references(case)
        generators = {}
        if "base" in variants:
            generators["base"] = lambda seed: generate(world, [case.subject["words"]], seed=seed,
                                                       progress=lambda *_: None)
        for name, settings in settings_of.items():
            if name not in variants:
                continue
            data = subject_set(world, case, dino if settings.alignment_weight else None,
                               16 if settings.preservation_weight else 0)
            lora = train_subject(world.backbone, data, settings, out / "work" / case.name / name)
            generators[name] = lambda seed, lora=lora: generate_with_loras(world, [lora], [SUBJECT_WORD], seed)
        for name, run in generators.items():
            for seed in seeds:
                rows.append({"case": case.name, "method": name, "seed": seed, **measure(case, run(seed)[0],
                                                                                         references)})
            print(f"{case.name} / {name}: " + ", ".join(
                f"{k} {mean_over_rows([r for r in rows if r['case'] == case.name and r['method'] == name], k):.3f}"
                for k in COLUMNS), flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {m: {k: mean_over_rows([r for r in rows if r["method"] == m], k) for k in COLUMNS} for m in methods}
    (out / "subject_ceiling.json").write_text(json.dumps({"rows": rows, "summary": summary, "seeds": seeds},
                                                         indent=1))
    lines = ["| subject drawn by | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in COLUMNS) + " |" for m, v in summary.items()]
    (out / "subject_ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
