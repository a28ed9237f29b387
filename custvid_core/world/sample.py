"""Sampling a flow-matching model (Wan's objective) with classifier-free guidance.

`x_sigma = sigma * noise + (1 - sigma) * x0` and the model predicts `v = noise - x0`, so an Euler
step is `x += (sigma_next - sigma) * v`. The schedule is Wan's shifted one:
`sigma = shift * t / (1 + (shift - 1) * t)` for t from 1 to 0.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..backbones.wan import WanBackbone
from ..control.boxes import BoxSteering, PromptSteering
from ..control.camera import CameraPath, LatentShift, StepWindow
from ..control.sampling import Controls, LatentView, SamplingControl, SamplingStep, conditional_rows, cross_attention_hook
from ..errors import InputError


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    if steps < 1:
        raise InputError("steps", f"{steps}", "at least 1 step")
    if shift <= 0:
        raise InputError("shift", f"{shift}", "a positive shift (Wan uses 3 to 8)")
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample_flow(backbone: WanBackbone, context: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor,
                steps: int = 30, cfg: float = 4.0, shift: float = 3.0, controls: Sequence[SamplingControl] = (),
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Euler sampling from `noise` (`[B, C, T, H, W]`) to clean latents. With `cfg` != 1 the
    conditional and unconditional passes run as one batch, the conditional rows first. `controls` act
    through the sampling contract (`control/sampling.py`), in order."""
    sigmas = flow_sigmas(steps, shift)
    x = noise
    guided = uncond is not None and cfg != 1.0
    both = torch.cat([context, uncond]) if guided else context
    rows = conditional_rows([0, 1] if guided else [0], both.shape[0])
    control = Controls(controls)
    now: dict[str, SamplingStep] = {}  # the step being run, for the attention hook
    edited = contextlib.nullcontext()
    if control.edits_attention:
        edited = backbone.text_cross_attention(cross_attention_hook(control, lambda: now["step"],
                                                                    backbone.token_grid(noise.shape)))
    bar = None
    if progress is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="sampling", unit="step", leave=False)
    with edited:
        for i in range(steps):
            step = SamplingStep.of(i, sigmas, rows)
            now["step"] = step
            control.before_step(step)
            if guided:
                v_cond, v_uncond = backbone.forward(torch.cat([x, x]), step.sigma, both).chunk(2)
                v = v_uncond + cfg * (v_cond - v_uncond)
            else:
                v = backbone.forward(x, step.sigma, both)
            x = x + (step.sigma_next - step.sigma) * v
            x = control.after_step(step, x)
            if bar is not None:
                bar.update(1)
            else:
                progress(i + 1, steps)
    if bar is not None:
        bar.close()
    return x


def generate(world, prompts: list[str] | str, seed: int = 0, steps: int = 30, cfg: float = 4.0, shift: float = 3.0,
             negative: str = "", controls: Sequence[SamplingControl] = (),
             progress: Callable[[int, int], None] | None = None,
             camera: CameraPath | None = None, camera_window: StepWindow = StepWindow(),
             camera_boxes: torch.Tensor | None = None, steering: list[BoxSteering] | None = None,
             frames: int | None = None) -> torch.Tensor:
    """Prompts -> clips `[B, F, H, W, 3]` in [0, 1] from the world model (`generate_latents`, decoded)."""
    from .latent import decode

    return decode(generate_latents(world, prompts, seed, steps, cfg, shift, negative, controls, progress, camera,
                                   camera_window, camera_boxes, steering, frames))


def generate_latents(world, prompts: list[str] | str, seed: int = 0, steps: int = 30, cfg: float = 4.0,
                     shift: float = 3.0, negative: str = "", controls: Sequence[SamplingControl] = (),
                     progress: Callable[[int, int], None] | None = None,
                     camera: CameraPath | None = None, camera_window: StepWindow = StepWindow(),
                     camera_boxes: torch.Tensor | None = None, steering: list[BoxSteering] | None = None,
                     frames: int | None = None) -> torch.Tensor:
    """Prompts -> latents `[B, C, T, H, W]` from the world model; one noise seed per call.

    camera: a camera path realised by latent shift during `camera_window` (subject boxes
    `[frames, N, 4]` keep the fill off the subject); steering: box steering, one per prompt;
    controls: more sampling controls (e.g. per-step adapter strengths), run after the camera and the steering;
    frames: clip length (a multiple of 5; the model was trained on `world.spec.frames`)."""
    from .latent import LATENT_CHANNELS, SPATIAL_FACTOR, TEMPORAL_FACTOR, as_frames, from_frames

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    spec = world.spec
    with torch.no_grad():
        context = world.text(prompts)
        uncond = world.text([negative] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    side = spec.size // SPATIAL_FACTOR
    frames = frames or spec.frames
    noise = torch.randn(len(prompts), LATENT_CHANNELS, frames // TEMPORAL_FACTOR, side, side, generator=g)
    own: list[SamplingControl] = []
    if camera is not None:  # the world's latent holds its frames in channels: shift in frame space
        own.append(LatentView(LatentShift(camera, steps, frames, camera_window, camera_boxes, seed),
                              as_frames, from_frames))
    if steering:
        if len(steering) != len(prompts):
            raise InputError("steering", f"{len(steering)} for {len(prompts)} prompts", "one per prompt")
        own.append(PromptSteering(steering))
    return sample_flow(world.backbone, context, uncond, noise, steps, cfg, shift, [*own, *controls], progress)
