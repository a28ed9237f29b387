"""Training-free controls measured on the shapes world: camera by latent shift and box steering.

`python -m custvid_core bench-control --out DIR` writes `control.json` and `control.md`:
- camera: for pans along both axes at several speeds, the pan measured on the generated background
  (phase correlation, the subject masked out) against the commanded one, and whether the subject is
  still recognised (colour and shape as without the camera move);
- boxes: for subject paths the base model never saw (diagonal, U-turn), the fraction of frames whose
  subject centroid lies in the commanded box, steered and unsteered, for each (alpha, tau).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...control.boxes import BoxSteering, BoxTrack
from ...control.camera import CameraPath, LatentShift, StepWindow
from ...control.sampling import SamplingStep
from ..evaluate import vocabulary_prompts
from ..latent import TEMPORAL_FACTOR, as_frames, decode, encode, from_frames
from ..measures import box_adherence, camera_pan, centroids, describe_clip, track
from ..sample import generate
from ..scene import SEEN_SHAPES, render

CAMERA_PANS = ((0.15, 0.0), (-0.15, 0.0), (0.3, 0.0), (-0.3, 0.0), (0.0, 0.15), (0.0, -0.15), (0.0, 0.3), (0.0, -0.3))
# Paths over four latent frames (20 frames); each latent frame is steered to the box at its time.
BOX_PATHS = {
    "diagonal": "0: 0.0, 0.0, 0.5, 0.5\n1: 0.5, 0.5, 1.0, 1.0",
    "u_turn": "0: 0.0, 0.25, 0.5, 0.75\n0.5: 0.5, 0.25, 1.0, 0.75\n1: 0.0, 0.25, 0.5, 0.75",
}
BOX_SETTINGS = ((2.0, 0.3), (5.0, 0.3), (10.0, 0.3), (5.0, 0.6))


@dataclass
class ControlBenchSettings:
    prompts: int = 8
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 30
    cfg: float = 4.0
    window: StepWindow = StepWindow(0.2, 0.4)
    box_frames: int = 20
    parts: tuple[str, ...] = ("boxes", "camera")


def _subject_words(prompt: str) -> str:
    return prompt.split(" moving")[0]


def shifted_render_pan(scenes, pan_x: float, pan_y: float, spec) -> float:
    """The measurement's own error: the camera shift applied once to the latents of rendered clips of the
    prompts (no model), then measured like a generated clip. Mean relative error."""
    commanded = torch.tensor([pan_x * spec.size, pan_y * spec.size])
    errors = []
    for scene in scenes:
        clip = render(scene, spec)
        x = encode(clip.frames)
        mover = LatentShift(CameraPath.constant(pan_x, pan_y), 1, spec.frames, StepWindow(0.0, 1.0))
        frames = decode(from_frames(mover.after_step(SamplingStep(0, 1, 1.0, 0.0), as_frames(x)), x))[0]
        errors.append(float((camera_pan(frames, track(frames))[-1] - commanded).norm() / commanded.norm()))
    return sum(errors) / len(errors)


def camera_rows(world, settings: ControlBenchSettings, log=print) -> list[dict]:
    scenes = vocabulary_prompts(settings.prompts, seed=1)
    prompts = [s.prompt() for s in scenes]
    size = world.spec.size
    rows = []
    references = {seed: generate(world, prompts, seed=seed, steps=settings.steps, cfg=settings.cfg,
                                 progress=lambda *_: None) for seed in settings.seeds}
    # The pan each unshifted clip shows of itself (a model that saw pans in training may drift on its own),
    # and what it shows, measured once for every pan.
    own_pans = {seed: [camera_pan(f, track(f))[-1] for f in clips] for seed, clips in references.items()}
    own_pan_px = float(torch.stack([p.norm() for pans in own_pans.values() for p in pans]).mean())
    described = {seed: [describe_clip(f, SEEN_SHAPES) for f in clips] for seed, clips in references.items()}
    for pan_x, pan_y in CAMERA_PANS:
        commanded = torch.tensor([pan_x * size, pan_y * size])
        errors, added_errors, kept = [], [], []
        for seed in settings.seeds:
            clips = generate(world, prompts, seed=seed, steps=settings.steps, cfg=settings.cfg,
                             camera=CameraPath.constant(pan_x, pan_y), camera_window=settings.window,
                             progress=lambda *_: None)
            for frames, unshifted, own in zip(clips, described[seed], own_pans[seed]):
                measured = camera_pan(frames, track(frames))[-1]
                errors.append(float((measured - commanded).norm() / commanded.norm()))
                added_errors.append(float((measured - own - commanded).norm() / commanded.norm()))
                shifted = describe_clip(frames, SEEN_SHAPES)
                kept.append(shifted.colour == unshifted.colour and shifted.shape == unshifted.shape)
        row = {"pan_x": pan_x, "pan_y": pan_y, "commanded_px": commanded.norm().item(),
               "relative_error": sum(errors) / len(errors),
               "within_10_percent": sum(e <= 0.1 for e in errors) / len(errors),
               "added_pan_error": sum(added_errors) / len(added_errors),
               "own_pan_px": own_pan_px,
               "subject_kept": sum(kept) / len(kept), "clips": len(errors),
               "shifted_render_error": shifted_render_pan(scenes, pan_x, pan_y, world.spec)}
        log(f"camera ({pan_x:+.2f}, {pan_y:+.2f}): error {row['relative_error']:.3f}, "
            f"added to the clip's own pan {row['added_pan_error']:.3f}, "
            f"within 10% {row['within_10_percent']:.2f}, subject kept {row['subject_kept']:.2f}, "
            f"shifted renders {row['shifted_render_error']:.3f}")
        rows.append(row)
    return rows


def box_rows(world, settings: ControlBenchSettings, log=print) -> list[dict]:
    scenes = vocabulary_prompts(settings.prompts, seed=2)
    prompts = [s.prompt() for s in scenes]
    latent_frames = settings.box_frames // TEMPORAL_FACTOR
    rows = []
    for name, text in BOX_PATHS.items():
        path = BoxTrack.parse(text)
        # Each frame is judged against its latent frame's box: what the world's latent can be steered to.
        frame_boxes = path.per_frame(latent_frames).repeat_interleave(TEMPORAL_FACTOR, 0)
        for alpha, tau in ((0.0, 0.0), *BOX_SETTINGS):
            scores = []
            for seed in settings.seeds:
                steering = None if alpha == 0 else [
                    BoxSteering(path, world.text.token_roles(p, _subject_words(p)), alpha=alpha, tau=tau) for p in prompts]
                clips = generate(world, prompts, seed=seed, steps=settings.steps, cfg=settings.cfg,
                                 frames=settings.box_frames, steering=steering, progress=lambda *_: None)
                for frames in clips:
                    masks = track(frames)
                    present = masks.flatten(1).any(1)
                    trajectory = centroids(masks)
                    scores.append(box_adherence(trajectory[present], frame_boxes[present]) * float(present.float().mean()))
            row = {"path": name, "steered": alpha > 0, "alpha": alpha, "tau": tau,
                   "in_box": sum(scores) / len(scores), "clips": len(scores)}
            log(f"boxes {name} alpha {alpha} tau {tau}: in box {row['in_box']:.3f}")
            rows.append(row)
    return rows


def run_control_bench(world, out: str | Path, settings: ControlBenchSettings = ControlBenchSettings(),
                      log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"settings": {"prompts": settings.prompts, "seeds": list(settings.seeds), "steps": settings.steps,
                           "cfg": settings.cfg, "window": [settings.window.start, settings.window.end],
                           "box_frames": settings.box_frames},
              "camera": camera_rows(world, settings, log) if "camera" in settings.parts else [],
              "boxes": box_rows(world, settings, log) if "boxes" in settings.parts else []}
    result["seconds"] = time.perf_counter() - t0
    (out / "control.json").write_text(json.dumps(result, indent=2))
    lines = []
    if result["camera"]:
        lines += ["| camera pan (x, y) | commanded (px) | relative error | within 10% | error of the pan added to "
                  "the unshifted clip's own | subject kept | shifted renders, no model |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| ({r['pan_x']:+.2f}, {r['pan_y']:+.2f}) | {r['commanded_px']:.1f} | {r['relative_error']:.3f} | "
                  f"{r['within_10_percent']:.2f} | {r['added_pan_error']:.3f} | {r['subject_kept']:.2f} | "
                  f"{r['shifted_render_error']:.3f} |" for r in result["camera"]] + [""]
    if result["boxes"]:
        lines += ["| path | steering | alpha | tau | centroid in box |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['path']} | {'yes' if r['steered'] else 'no'} | {r['alpha']:g} | {r['tau']:g} | "
                  f"{r['in_box']:.3f} |" for r in result["boxes"]]
    (out / "control.md").write_text("\n".join(lines) + "\n")
    return result
