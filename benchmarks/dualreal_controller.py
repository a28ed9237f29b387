"""Why DualReal's StageBlender controller saturates on the shapes world: a short DualReal run on one case, with the
controller's inner magnitudes at every step and, at the end, the identity weight it gives each kind of input.

    .venv/bin/python benchmarks/dualreal_controller.py --case purple_heart_bounce --steps 400 --out out/controller.json

Per step: the task, the identity weight per group, the mean |value| of the max-pooled tokens, of `c` (their
projection), of `gate * c` (the path around the LayerNorm), of the hidden features the last layer reads and of its
output `z` before the sigmoid, and the gradient of the step's loss with respect to `z` (positive: the step pushes
the identity weight down). At the end, with the trained controller: its identity weight on each task's own inputs
(photos with the subject's prompt, the clips with the motion's, the moving clips), on crossed ones (photos with the
motion's prompt, clips with the subject's) and on what generation feeds it (noise, "sks mtn"), at three noise levels.
`--variant` runs the same recipe with one change, for comparison (see VARIANTS).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from custvid_core.adapters.parts import attached
from custvid_core.adapters.stage_blender import StageBlender, StageBlenderPart, dualreal_parts
from custvid_core.training.dualreal import dualreal_weights, train_dualreal
from custvid_core.world.bench.methods import dualreal_methods
from custvid_core.world.cases import load_cases
from custvid_core.world.customize import MOTION_WORD, SUBJECT_WORD, motion_set, subject_set
from custvid_core.world.model import load_world

STATS: list[dict] = []
_forward = StageBlender.forward


def _instrumented(self: StageBlender, tokens: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """StageBlender.forward, recording its magnitudes (the same ops in the same order)."""
    shift, scale, gate = self.time(time).chunk(3, dim=1)
    pooled = tokens.max(dim=1).values
    c = self.tokens(pooled)
    f = self.norm(c) * (1 + scale) + shift
    around = gate * c
    f = self.mlp(f) + around
    hidden = self.fuse[:-1](f)
    z = self.fuse[-1](hidden)
    STATS.append({k: float(v.detach().abs().mean()) for k, v in
                  (("pooled", pooled), ("c", c), ("gate_c", around), ("f", f), ("hidden", hidden), ("z", z))})
    STATS[-1]["z_signed"] = float(z.detach().mean())
    if z.requires_grad:  # the step's push on the identity weight: d loss / d z, mean over groups (> 0: down)
        record = STATS[-1]
        z.register_hook(lambda grad: record.update(dloss_dz=float(grad.mean())))
    return torch.sigmoid(z)


def _probe(world, weights, subject, clips, sigmas=(0.9, 0.5, 0.1)) -> dict:
    """The controller's identity weight per group, mean over items, for each kind of input at each noise level."""
    parts = dualreal_parts(weights)
    controller = next(p for p in parts if isinstance(p, StageBlenderPart))
    text = world.text
    with torch.no_grad():
        prompts = {name: text([words]) for name, words in
                   (("subject", SUBJECT_WORD), ("motion", MOTION_WORD), ("both", f"{SUBJECT_WORD} {MOTION_WORD}"))}
    g = torch.Generator().manual_seed(0)
    inputs = {"photos, subject prompt": (subject.latents, prompts["subject"]),
              "photos, motion prompt": (subject.latents, prompts["motion"]),
              "clips, motion prompt": (clips.latents, prompts["motion"]),
              "clips, subject prompt": (clips.latents, prompts["subject"]),
              "clips, both words": (clips.latents, prompts["both"]),
              "noise, both words (generation)": (torch.zeros_like(clips.latents[:4]), prompts["both"])}
    if subject.moving is not None:
        inputs["moving clips, subject prompt"] = (subject.moving.latents, prompts["subject"])
    out = {}
    with torch.no_grad(), attached(world.backbone, parts):
        for name, (latents, context) in inputs.items():
            rows = {}
            for sigma in sigmas:
                noise = torch.randn(latents.shape, generator=g)
                x = (1 - sigma) * latents + sigma * noise
                world.backbone.forward(x, torch.full((len(x),), sigma), context.expand(len(x), -1, -1))
                rows[str(sigma)] = [round(v, 4) for v in controller.identity_weights().mean(0).tolist()]
            out[name] = rows
    return out


# The authors' recipe, and the controller at a hundredth of the adapters' learning rate (the one other rate tried).
VARIANTS = {
    "authors": {},
    "controller_lr_1e-5": {"controller_lr": 1e-5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="purple_heart_bounce")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variant", default="authors", choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    StageBlender.forward = _instrumented
    world = load_world()
    case = next(c for c in load_cases() if c.name == args.case)
    method = dualreal_methods()["dualreal"]
    settings = replace(method.settings, **VARIANTS[args.variant])
    settings = replace(settings, optim=replace(settings.optim, steps=args.steps, checkpoint_every=args.steps))
    subject = subject_set(world, case, preservation=0, moving_clips=method.moving_clips)
    clips = motion_set(world, case, hue_copies=method.hue_copies)
    trained = train_dualreal(world.backbone, subject, clips, settings)
    steps = []
    for record, stats in zip(trained.history, STATS):
        task = next(k for k in ("identity_moving", "identity", "motion") if k in record)
        weights = [record[k] for k in sorted(record) if k.startswith("identity_weight_")]
        steps.append({"step": record["step"], "task": task, "loss": record[task], "identity_weights": weights, **stats})
    probe = _probe(world, dualreal_weights(trained), subject, clips)
    result = {"command": " ".join(["benchmarks/dualreal_controller.py", "--case", args.case, "--steps",
                                   str(args.steps), "--variant", args.variant]),
              "settings": repr(settings), "blocks": world.backbone.num_blocks, "steps": steps, "probe": probe}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, rows in probe.items():
        print(f"{name:34s}", {s: [f"{v:.3g}" for v in w] for s, w in rows.items()})


if __name__ == "__main__":
    main()
