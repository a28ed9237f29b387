"""Training performance, as ratios measured in one run on one machine (absolute times vary by machine).

`python -m custvid_core bench-training --out DIR` measures on a small Wan (diffusers'
WanTransformer3DModel, random weights):
- seconds per step of the full subject objective (region loss, token attention, SuRA; preservation steps
  apart) over a plain LoRA step (MSE) on the same images;
- peak memory of a training step with gradient checkpointing over one without (each in its own
  process, as peak resident memory above the process's state before the first step).
It writes `training_perf.json` and `training_perf.md` in DIR.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# Big enough that attention and the FFN dominate, small enough for a CPU: 4 heads of 64, 8 blocks.
PERF_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                text_dim=512, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def _backbone():
    from diffusers import WanTransformer3DModel

    from .backbones import describe

    torch.manual_seed(0)
    return describe(WanTransformer3DModel(**PERF_WAN))


def _subject_data(side: int = 32, images: int = 4, clip_frames: int = 4):
    from .training import SubjectSet, VideoSet

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(images, 1, 1, side, side)
    masks[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    clips = VideoSet(torch.randn(2, 16, clip_frames, side, side, generator=g), torch.randn(2, 32, 512, generator=g))
    return SubjectSet(torch.randn(images, 16, 1, side, side, generator=g), torch.randn(1, 32, 512, generator=g), masks,
                      torch.randn(images, 384, 16, 16, generator=g), clips, subject_tokens=(1, 2))


def _settings(kind: str, steps: int, checkpointing: bool = False):
    from .training import OptimSettings, SubjectSettings

    optim = OptimSettings(steps=steps, lr=1e-4, warmup=1, checkpoint_every=10 ** 6)
    plain = SubjectSettings(rank=32, optim=optim, region_loss=False, preservation_weight=0.0, alignment_weight=0.0,
                            token_attention_weight=0.0, alignment_block=3, gradient_checkpointing=checkpointing)
    full_objective = dict(region_loss=True, alignment_weight=0.05, token_attention_weight=0.01)
    if kind == "plain":
        return plain
    if kind == "full_image_steps":  # region + token attention + SuRA on every step: the objective's own cost
        return replace(plain, **full_objective)
    if kind == "full_image_steps_2048":  # the same with REPA's full-width projector, as on real Wan
        return replace(plain, **full_objective, projector_hidden=2048)
    return replace(plain, **full_objective, preservation_weight=1.0)  # "full"


def step_seconds(kind: str, steps: int = 12, warmup: int = 2) -> float:
    """Median seconds of the steps after `warmup`, from the loop's own per-step timing."""
    from .training import train_subject

    history = train_subject(_backbone(), _subject_data(), _settings(kind, steps + warmup)).history
    times = sorted(r["seconds"] for r in history[warmup:])
    return times[len(times) // 2]


def peak_memory_mb(checkpointing: bool, steps: int = 3) -> float:
    """Peak resident memory (MB) a few training steps add to this process (run it in a fresh process)."""
    import resource

    from .training import train_subject

    # A batch big enough that activations, not the model, set the peak.
    backbone, data = _backbone(), _subject_data(side=64, images=8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_subject(backbone, data, replace(_settings("plain", steps, checkpointing), batch=8))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _in_fresh_process(expression: str) -> float:
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()}); import custvid_core.perf as p; " \
           f"print({expression})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_training_bench(out: str | Path, steps: int = 12) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plain = step_seconds("plain", steps)
    image_steps = step_seconds("full_image_steps", steps)
    image_steps_2048 = step_seconds("full_image_steps_2048", steps)
    full = step_seconds("full", steps)
    with_ckpt = _in_fresh_process("p.peak_memory_mb(True)")
    without = _in_fresh_process("p.peak_memory_mb(False)")
    result = {
        "model": PERF_WAN, "threads": torch.get_num_threads(), "steps_timed": steps,
        "step_seconds": {"plain_lora": plain, "full_objective_image_step": image_steps,
                         "full_objective_image_step_2048_projector": image_steps_2048,
                         "full_objective_with_preservation": full},
        "ratios": {"full_image_step_over_plain": image_steps / plain,
                   "full_image_step_2048_projector_over_plain": image_steps_2048 / plain,
                   "full_with_preservation_over_plain": full / plain,
                   "peak_memory_checkpointing_over_none": with_ckpt / without},
        "peak_memory_mb": {"gradient_checkpointing": with_ckpt, "none": without},
        "seconds": time.perf_counter() - t0,
    }
    (out / "training_perf.json").write_text(json.dumps(result, indent=2))
    r = result["ratios"]
    (out / "training_perf.md").write_text(
        "| measurement | ratio |\n| --- | --- |\n"
        f"| full subject objective (region + token attention + SuRA) step / plain LoRA step | "
        f"{r['full_image_step_over_plain']:.2f} |\n"
        f"| the same with a 2048-wide SuRA projector / plain LoRA step | "
        f"{r['full_image_step_2048_projector_over_plain']:.2f} |\n"
        f"| full objective incl. preservation steps / plain LoRA step | {r['full_with_preservation_over_plain']:.2f} |\n"
        f"| peak memory with gradient checkpointing / without | {r['peak_memory_checkpointing_over_none']:.2f} |\n")
    return result


# --- sampling with training-free controls --------------------------------------------------------------

def _control_world(size: int = 24, frames: int = 20, context: int = 512):
    """A world-layout sampler over the PERF_WAN model, with a text context as long as umt5's (512)."""
    from .world.model import World
    from .world.scene import WorldSpec
    from .world.text import WorldTextEncoder

    return World(_backbone(), WorldTextEncoder(dim=PERF_WAN["text_dim"], length=context),
                 WorldSpec(size=size, frames=frames))


def _control_sampler(control: str, size: int):
    """A function running one sampling with `control` in plain / steering / camera / both. The camera
    shifts at every step (window 0..1): the cost of a shifted step, not averaged over a short window."""
    from .control.boxes import BoxSteering, BoxTrack
    from .control.camera import CameraPath, StepWindow
    from .world.sample import generate

    world = _control_world(size)
    prompt = "red striped circle moving right"
    extra = {}
    if control in ("steering", "both"):
        path = BoxTrack.parse("0: 0, 0, 0.5, 0.5\n1: 0.5, 0.5, 1, 1")
        extra["steering"] = [BoxSteering(path, world.text.token_roles(prompt, "red striped circle"))]
    if control in ("camera", "both"):
        extra.update(camera=CameraPath.constant(0.3, 0.1), camera_window=StepWindow(0.0, 1.0))
    return lambda steps: generate(world, [prompt], steps=steps, progress=lambda *_: None, **extra)


def sampling_step_seconds(controls=("plain", "steering", "camera", "both"), steps: int = 10, rounds: int = 4,
                          size: int = 48) -> dict[str, float]:
    """Seconds per sampling step (CFG) of each control: the best of `rounds` runs, the controls taking
    turns in every round so that a slower or faster spell of the machine hits them all alike.

    `size`: frame side. At 48 the clip has 2304 visual tokens against 512 text tokens, so self-attention
    outweighs the cross-attention that steering edits, as on real Wan (32760 against 512 at 480p, 81
    frames); smaller frames overstate steering's share of a step."""
    samplers = {c: _control_sampler(c, size) for c in controls}
    best = {c: float("inf") for c in controls}
    with torch.no_grad():
        for c in controls:  # warm-up
            samplers[c](2)
        for _ in range(rounds):
            for c in controls:
                t0 = time.perf_counter()
                samplers[c](steps)
                best[c] = min(best[c], (time.perf_counter() - t0) / steps)
    return best


def sampling_peak_memory_mb(control: str, size: int = 48, steps: int = 4) -> float:
    """Peak resident memory (MB) above the resident memory before sampling that one sampling with `control`
    reaches (run it in a fresh process; Linux)."""
    import resource

    sample = _control_sampler(control, size)
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20
    with torch.no_grad():
        sample(steps)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident


def run_control_perf(out: str | Path, steps: int = 10, size: int = 48) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = sampling_step_seconds(steps=steps, size=size)
    memory = {c: _in_fresh_process(f"p.sampling_peak_memory_mb('{c}', {size})") for c in ("plain", "steering")}
    result = {"model": PERF_WAN, "latent": f"[1, 16, 4, {size}, {size}] (20 world frames), text context 512",
              "threads": torch.get_num_threads(), "steps_timed": steps, "step_seconds": seconds,
              "peak_memory_mb": memory,
              "ratios": {**{f"{c}_over_plain": seconds[c] / seconds["plain"] for c in ("steering", "camera", "both")},
                         "steering_peak_memory_over_plain": memory["steering"] / memory["plain"]}}
    (out / "control_perf.json").write_text(json.dumps(result, indent=2))
    r = result["ratios"]
    (out / "control_perf.md").write_text(
        "| sampling step | ratio to plain |\n| --- | --- |\n"
        f"| box steering (all blocks, conditional pass; tau 0.3) | {r['steering_over_plain']:.3f} |\n"
        f"| camera shift (a shift after every step) | {r['camera_over_plain']:.3f} |\n"
        f"| both | {r['both_over_plain']:.3f} |\n"
        f"| peak memory of a sampling with box steering / without | {r['steering_peak_memory_over_plain']:.3f} |\n")
    return result
