"""Sampling a flow-matching model (Wan's objective) with classifier-free guidance.

`x_sigma = sigma * noise + (1 - sigma) * x0` and the model predicts `v = noise - x0`, so an Euler
step is `x += (sigma_next - sigma) * v`. The schedule is Wan's shifted one:
`sigma = shift * t / (1 + (shift - 1) * t)` for t from 1 to 0.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..backbones.wan import WanBackbone
from ..control.boxes import BoxSteering
from ..control.camera import CameraPath, LatentShift, StepWindow
from ..errors import InputError


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    if steps < 1:
        raise InputError("steps", f"{steps}", "at least 1 step")
    if shift <= 0:
        raise InputError("shift", f"{shift}", "a positive shift (Wan uses 3 to 8)")
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


# step_hook(step, sigma, sigma_next, x) -> x: lets controls (camera shift, ...) act between steps.
StepHook = Callable[[int, float, float, torch.Tensor], torch.Tensor]
# before_step(step, steps): lets controls change the model before a step (per-step adapter strengths).
BeforeStep = Callable[[int, int], None]


@torch.no_grad()
def sample_flow(backbone: WanBackbone, context: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor,
                steps: int = 30, cfg: float = 4.0, shift: float = 3.0, step_hook: StepHook | None = None,
                progress: Callable[[int, int], None] | None = None,
                before_step: BeforeStep | None = None) -> torch.Tensor:
    """Euler sampling from `noise` (`[B, C, T, H, W]`) to clean latents. With `cfg` != 1 the
    conditional and unconditional passes run as one batch."""
    sigmas = flow_sigmas(steps, shift)
    x = noise
    guided = uncond is not None and cfg != 1.0
    both = torch.cat([context, uncond]) if guided else context
    bar = None
    if progress is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="sampling", unit="step", leave=False)
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if before_step is not None:
            before_step(i, steps)
        if guided:
            v_cond, v_uncond = backbone.forward(torch.cat([x, x]), s, both).chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        else:
            v = backbone.forward(x, s, both)
        x = x + (s_next - s) * v
        if step_hook is not None:
            x = step_hook(i, s, s_next, x)
        if bar is not None:
            bar.update(1)
        else:
            progress(i + 1, steps)
    if bar is not None:
        bar.close()
    return x


def generate(world, prompts: list[str] | str, seed: int = 0, steps: int = 30, cfg: float = 4.0, shift: float = 3.0,
             negative: str = "", step_hook: StepHook | None = None,
             progress: Callable[[int, int], None] | None = None, before_step: BeforeStep | None = None,
             camera: CameraPath | None = None, camera_window: StepWindow = StepWindow(),
             camera_boxes: torch.Tensor | None = None, steering: list[BoxSteering] | None = None,
             frames: int | None = None) -> torch.Tensor:
    """Prompts -> clips `[B, F, H, W, 3]` in [0, 1] from the world model; one noise seed per call.

    camera: a camera path realised by latent shift during `camera_window` (subject boxes
    `[frames, N, 4]` keep the fill off the subject); steering: box steering, one per prompt;
    frames: clip length (a multiple of 5; the model was trained on `world.spec.frames`)."""
    from .latent import LATENT_CHANNELS, SPATIAL_FACTOR, TEMPORAL_FACTOR, as_frames, decode, from_frames

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    spec = world.spec
    with torch.no_grad():
        context = world.text(prompts)
        uncond = world.text([negative] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    side = spec.size // SPATIAL_FACTOR
    frames = frames or spec.frames
    noise = torch.randn(len(prompts), LATENT_CHANNELS, frames // TEMPORAL_FACTOR, side, side, generator=g)
    mover = None if camera is None else LatentShift(camera, steps, frames, camera_window, camera_boxes, seed)
    now = {"progress": 0.0}  # the step the sampler is at, for steering

    def after_step(i, s, s_next, x):
        if step_hook is not None:
            x = step_hook(i, s, s_next, x)
        if mover is not None:  # the world's latent holds its frames in channels: shift in frame space
            x = from_frames(mover.after_step(i, as_frames(x)), x)
        return x

    def before(i, n):
        now["progress"] = i / n
        if before_step is not None:
            before_step(i, n)

    steered = contextlib.nullcontext()
    if steering:
        if len(steering) != len(prompts):
            raise InputError("steering", f"{len(steering)} for {len(prompts)} prompts", "one per prompt")
        grid = world.backbone.token_grid(noise.shape)

        def edits(block, q_len, k_len):  # conditional rows only: with guidance they come first
            return {row: s.edit(grid, k_len, now["progress"]) for row, s in enumerate(steering) if s.steers(block)}

        steered = world.backbone.cross_attention_edits(edits)
    with steered:
        latents = sample_flow(world.backbone, context, uncond, noise, steps, cfg, shift, after_step, progress, before)
    return decode(latents)
