"""The benchmark: customization methods measured on shapes-world cases.

`python -m custvid_core bench --cases FILE --out DIR [--methods base,...] [--seeds 0,1] [--sampling-steps 30]` prepares
each method on each case (training, if the method trains), generates the case's prompts for every
seed and measures subject match and motion match against the case's ground truth. It writes
`results.json` (every clip), `results.csv` and `results.md` (per case and averaged per method).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Callable, Protocol

import torch

from ...errors import InputError
from .. import measures as metrics
from ..cases import Case, load_cases
from ..model import World, load_world
from ..sample import generate
from ..scene import COLOURS, SHAPES, render
from .methods import bench_methods, method_names

# (prompts, seed) -> clips [B, F, H, W, 3]
Generator = Callable[[list[str], int], torch.Tensor]


class Method(Protocol):
    name: str
    sampling_steps: int

    def prepare(self, world: World, case: Case, workdir: Path) -> tuple[Generator, dict]:
        """Learn the case if the method learns; return a generator and the prompt words to use."""


@dataclass
class BaseModel:
    """No customization: the base model prompted with the case's own words ("no customization" row)."""

    name: str = "base"
    sampling_steps: int = 30
    cfg: float = 4.0
    progress_bars: bool = False  # a tqdm bar while sampling (the benchmark runs without)

    def prepare(self, world, case, workdir):
        def run(prompts, seed):
            return generate(world, prompts, seed=seed, steps=self.sampling_steps, cfg=self.cfg,
                            progress=None if self.progress_bars else lambda *_: None)

        return run, {"subject": case.subject.get("words", ""), "motion": case.motion.get("words", "")}


def _file_method(name: str) -> Callable[[], Method]:
    return lambda: bench_methods()[name]


# "base" (no customization) and the methods of methods.toml (LoRA and DualReal), in its order (the ladder first).
METHODS: dict[str, Callable[[], Method]] = {"base": BaseModel, **{n: _file_method(n) for n in method_names()}}

METRICS = ("colour_match", "colour_distance", "shape_match", "shape_iou", "texture_correlation",
           "path_shape_error", "direction_cosine", "speed_ratio", "present", "flicker", "clip_colour_leak")
# The product's metrics (custvid_core.eval) with the world's DINOv2 and RAFT, beside the analytic measures above.
ENCODER_METRICS = ("dino_i", "dynamic_degree_deviation", "box_flow_error")
METRICS += ENCODER_METRICS


def subject_references(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The case's subject photos as (frame, mask) pairs for `measure`, the masks found by the tracker that
    measures the clips, so both outlines are measured the same way."""
    return [(photo.frames[0], metrics.track(photo.frames)[0]) for photo in case.subject_images()]


def measure(case: Case, frames: torch.Tensor, references: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Subject and motion match of one generated clip against the case's ground truth (`references`: from
    `subject_references`)."""
    masks = metrics.track(frames)
    middle = int(masks.sum((1, 2)).argmax())
    hue = metrics.object_colour(frames, masks)
    target_hue = metrics.hue_of(torch.tensor(COLOURS[case.subject["colour"]]))
    shape = metrics.classify_shape(masks[middle], SHAPES)[0]
    path = metrics.path_error(metrics.centroids(masks), case.reference_path())
    colour = metrics.nearest_colour(hue)
    clip_colours = {c for c, _, _ in case.motion_subjects()} - {case.subject["colour"]}
    return {
        "colour_match": float(colour == case.subject["colour"]),
        "colour_distance": float((hue - target_hue).norm()) if not torch.isnan(hue).any() else math.nan,
        "shape_match": float(shape == case.subject["shape"]),
        "shape_iou": max(metrics.shape_iou(masks[middle], mask) for _, mask in references),
        "texture_correlation": max(metrics.texture_correlation(frames[middle], masks[middle], frame, mask)
                                   for frame, mask in references),
        "path_shape_error": path.shape_distance,
        "direction_cosine": path.direction_cosine,
        "speed_ratio": path.speed_ratio,
        "present": float((masks.sum((1, 2)) > 0).float().mean()),
        "flicker": metrics.flicker(frames, masks),
        # the colour of one of the motion clips' subjects instead of the prompted one: the motion carried its subject
        "clip_colour_leak": float(colour in clip_colours),
    }


@cache
def world_encoders():
    from ...eval.measure import Encoders
    from ...representations.motion import load_raft
    from ...representations.subject import load_dinov2
    from ..encoders import DINO_FILE, RAFT_FILE

    return Encoders(dino=load_dinov2(DINO_FILE), raft=load_raft(RAFT_FILE))


def encoder_targets(case: Case, references: list[tuple[torch.Tensor, torch.Tensor]]):
    """What `encoder_measures` compares a case's clips with: its photos, its motion clips' flow (computed once) and
    its path (the boxes of its motion rendered)."""
    from ...control.boxes import BoxTrack
    from ...eval.measure import Targets
    from ...representations.motion import compute_flow

    flows = [compute_flow(world_encoders().raft, c.frames, progress=lambda *_: None) for c in case.motion_clips()]
    return Targets(photos=[photo for photo, _ in references], clip_flows=flows,
                   boxes=BoxTrack.from_masks(render(case.motion_scene(), case.spec).masks))


def encoder_measures(frames: torch.Tensor, targets) -> dict:
    """DINO-I against the case's photos, the dynamic degree's deviation from its motion clips' and the flow error
    against its path, measured with the world's encoders (`targets` from `encoder_targets`)."""
    from ...eval.measure import measure_video

    scores = measure_video(frames, targets, world_encoders(), progress=lambda *_: None)
    return {k: scores[k] for k in ENCODER_METRICS}


def mean_over_rows(rows: list[dict], key: str) -> float:
    """The mean of `key` over the rows that measured it (NaN where a clip had no object to measure)."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def run_bench(cases_path: str | Path, out: str | Path, methods: list[str], seeds: list[int],
              world: World | None = None, log=print, sampling_steps: int = 30) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("--methods", f"'{unknown[0]}' is not a method", f"some of {', '.join(METHODS)}")
    if sampling_steps < 1:
        raise InputError("--sampling-steps", f"{sampling_steps}", "at least 1 sampling step per clip")
    cases = load_cases(cases_path)
    world = world or load_world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        references = subject_references(case)
        targets = encoder_targets(case, references)
        for method_name in methods:
            method = replace(METHODS[method_name](), sampling_steps=sampling_steps)
            t0 = time.perf_counter()
            run, words = method.prepare(world, case, out / "work" / case.name / method_name)
            prepare_seconds = time.perf_counter() - t0
            prompts = case.prompt_texts(words["subject"], words["motion"])
            for seed in seeds:
                clips = run(prompts, seed)
                for prompt, frames in zip(prompts, clips):
                    rows.append({"case": case.name, "method": method_name, "seed": seed, "prompt": prompt,
                                 "prepare_seconds": prepare_seconds, **measure(case, frames, references),
                                 **encoder_measures(frames, targets)})
            log(f"{case.name} / {method_name}: " + ", ".join(
                f"{k} {mean_over_rows([r for r in rows if r['case'] == case.name and r['method'] == method_name], k):.3f}"
                for k in ("colour_match", "shape_iou", "path_shape_error")))
    summary = _summaries(rows, methods, [c.name for c in cases])
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "seeds": seeds,
                                                  "sampling_steps": sampling_steps, "cases": str(cases_path)}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(_markdown(summary, cases_path, seeds))
    return summary


def _summaries(rows, methods, case_names) -> dict:
    out = {}
    for m in methods:
        per_case = {c: {k: mean_over_rows([r for r in rows if r["method"] == m and r["case"] == c], k) for k in METRICS}
                    for c in case_names}
        per_case["average"] = {k: mean_over_rows([r for r in rows if r["method"] == m], k) for k in METRICS}
        out[m] = per_case
    return out


def _markdown(summary, cases_path, seeds) -> str:
    header = "| method | case | " + " | ".join(METRICS) + " |"
    lines = [f"Cases: `{cases_path}`; seeds: {seeds}. Lower is better for colour_distance, path_shape_error, "
             "flicker, dynamic_degree_deviation and box_flow_error; speed_ratio is best at 1.", "", header,
             "|" + " --- |" * (len(METRICS) + 2)]
    for method, per_case in summary.items():
        for case, values in per_case.items():
            cells = " | ".join(f"{values[k]:.3f}" for k in METRICS)
            name = f"**{case}**" if case == "average" else case
            lines.append(f"| {method} | {name} | {cells} |")
    return "\n".join(lines) + "\n"
