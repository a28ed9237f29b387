"""Training and sampling performance, as ratios measured in one run on one machine (absolute times vary by
machine).

Every speed ratio comes from interleaved runs (`interleaved_ratios`): the plain side and the other side run
in turn, A B A B ..., after a warm-up, and the ratio is the median over adjacent pairs with its quartiles
and range, so a slower or faster spell of the machine (another job on a shared core) hits both sides of a
pair alike instead of one side's whole measurement.

`python -m custvid_core bench-training --out DIR` measures on a small Wan (diffusers'
WanTransformer3DModel, random weights):
- seconds per step of the full subject objective (region loss, token attention, SuRA; with and without
  preservation steps) over a plain LoRA step (MSE) on the same images;
- peak memory of a training step with gradient checkpointing over one without (each in its own
  process, as peak resident memory above the process's state before the first step).
It writes `training_perf.json` and `training_perf.md` in DIR.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ...errors import InputError

# Big enough that attention and the FFN dominate, small enough for a CPU: 4 heads of 64, 8 blocks.
PERF_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                text_dim=512, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def _backbone():
    from diffusers import WanTransformer3DModel

    from ...backbones import describe

    with torch.random.fork_rng(devices=[]):  # the same weights every time; the global generator left as it was
        torch.manual_seed(0)
        return describe(WanTransformer3DModel(**PERF_WAN))


def _subject_data(side: int = 32, images: int = 4, clip_frames: int = 4):
    from ...training import SubjectSet, VideoSet

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(images, 1, 1, side, side)
    masks[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
    clips = VideoSet(torch.randn(2, 16, clip_frames, side, side, generator=g), torch.randn(2, 32, 512, generator=g))
    return SubjectSet(torch.randn(images, 16, 1, side, side, generator=g), torch.randn(1, 32, 512, generator=g), masks,
                      torch.randn(images, 384, 16, 16, generator=g), clips, subject_tokens=(1, 2))


def _settings(kind: str, steps: int, checkpointing: bool = False):
    from ...training import OptimSettings, SubjectSettings

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


def interleaved_ratios(baseline: Callable[[], float], others: dict[str, Callable[[], float]], pairs: int = 5,
                       warmup: int = 1) -> dict[str, dict]:
    """Each of `others`' cost over `baseline`'s, from adjacent runs: every round runs the baseline and then one
    of the others, for each in turn (A B A C ...); the first `warmup` rounds are not counted. A run returns
    its cost (e.g. seconds per step). Per other: the median ratio of its `pairs` pairs with the quartiles
    and the range, every pair's ratio, and each side's median cost."""
    if pairs < 2:
        raise InputError("pairs", f"{pairs}", "at least 2 pairs of runs (a spread needs two)")
    costs = {name: ([], []) for name in others}  # name -> (baseline costs, its costs), one per pair
    for round_ in range(warmup + pairs):
        for name, run in others.items():
            pair = baseline(), run()
            if round_ >= warmup:
                for side, cost in zip(costs[name], pair):
                    side.append(cost)
    result = {}
    for name, (base, own) in costs.items():
        ratios = [o / b for b, o in zip(base, own)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        result[name] = {"median": median, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
                        "pair_ratios": ratios, "baseline_cost": statistics.median(base), "cost": statistics.median(own)}
    return result


def training_step_seconds(backbone, data, kind: str, steps: int) -> Callable[[], float]:
    """A function running a short training of `kind` and returning its mean seconds per step, the first step
    (optimizer state, first allocations) left out; a new LoRA on the same backbone each time."""
    from ...training import train_subject

    def run() -> float:
        history = train_subject(backbone, data, _settings(kind, steps + 1)).history
        return statistics.fmean(r["seconds"] for r in history[1:])

    return run


def peak_memory_mb(checkpointing: bool, steps: int = 3) -> float:
    """Peak resident memory (MB) a few training steps add to this process (run it in a fresh process)."""
    import resource

    from ...training import train_subject

    # A batch big enough that activations, not the model, set the peak.
    backbone, data = _backbone(), _subject_data(side=64, images=8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_subject(backbone, data, replace(_settings("plain", steps, checkpointing), batch=8))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _in_fresh_process(expression: str) -> float:
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()}); import custvid_core.world.bench.perf as p; " \
           f"print({expression})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _spread(ratio: dict, digits: int = 2) -> str:
    """A ratio as "median [q1, q3; min to max]"."""
    median, q1, q3, low, high = (f"{ratio[k]:.{digits}f}" for k in ("median", "q1", "q3", "min", "max"))
    return f"{median} [{q1}, {q3}; {low} to {high}]"


def run_training_bench(out: str | Path, steps: int = 4, pairs: int = 7, command: str = "") -> dict:
    """`steps`: timed steps per run (even, so the preservation schedule's two kinds of step count alike);
    `pairs`: interleaved plain / other runs per ratio."""
    if steps < 2 or steps % 2:
        raise InputError("steps", f"{steps}", "an even number of timed steps per run, 2 or more")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone, data = _backbone(), _subject_data()
    sides = {kind: training_step_seconds(backbone, data, kind, steps)
             for kind in ("plain", "full_image_steps", "full_image_steps_2048", "full")}
    timed = interleaved_ratios(sides.pop("plain"), sides, pairs)
    with_ckpt = _in_fresh_process("p.peak_memory_mb(True)")
    without = _in_fresh_process("p.peak_memory_mb(False)")
    names = {"full_image_steps": "full_image_step_over_plain",
             "full_image_steps_2048": "full_image_step_2048_projector_over_plain",
             "full": "full_with_preservation_over_plain"}
    result = {
        "command": command, "model": PERF_WAN, "threads": torch.get_num_threads(), "steps_per_run": steps,
        "pairs": pairs,
        "step_seconds": {"plain_lora": timed["full_image_steps"]["baseline_cost"],
                         "full_objective_image_step": timed["full_image_steps"]["cost"],
                         "full_objective_image_step_2048_projector": timed["full_image_steps_2048"]["cost"],
                         "full_objective_with_preservation": timed["full"]["cost"]},
        "ratios": {**{names[k]: v["median"] for k, v in timed.items()},
                   "peak_memory_checkpointing_over_none": with_ckpt / without},
        "spread": {names[k]: v for k, v in timed.items()},
        "peak_memory_mb": {"gradient_checkpointing": with_ckpt, "none": without},
        "seconds": time.perf_counter() - t0,
    }
    (out / "training_perf.json").write_text(json.dumps(result, indent=2))
    r, spread = result["ratios"], result["spread"]
    (out / "training_perf.md").write_text(
        f"Median ratio over {pairs} interleaved pairs of runs [quartiles; range].\n\n"
        "| measurement | ratio |\n| --- | --- |\n"
        f"| full subject objective (region + token attention + SuRA) step / plain LoRA step | "
        f"{_spread(spread['full_image_step_over_plain'])} |\n"
        f"| the same with a 2048-wide SuRA projector / plain LoRA step | "
        f"{_spread(spread['full_image_step_2048_projector_over_plain'])} |\n"
        f"| full objective incl. preservation steps / plain LoRA step | "
        f"{_spread(spread['full_with_preservation_over_plain'])} |\n"
        f"| peak memory with gradient checkpointing / without | {r['peak_memory_checkpointing_over_none']:.2f} |\n")
    return result


# --- sampling with training-free controls --------------------------------------------------------------

def _control_world(size: int = 24, frames: int = 20, context: int = 512):
    """A world-layout sampler over the PERF_WAN model, with a text context as long as umt5's (512)."""
    from ..model import World
    from ..scene import WorldSpec
    from ..text import WorldTextEncoder

    return World(_backbone(), WorldTextEncoder(dim=PERF_WAN["text_dim"], length=context),
                 WorldSpec(size=size, frames=frames))


def _control_sampler(control: str, size: int):
    """A function running one sampling with `control` in plain / steering / camera / both. The camera
    shifts at every step (window 0..1): the cost of a shifted step, not averaged over a short window."""
    from ...control.boxes import BoxSteering, BoxTrack
    from ...control.camera import CameraPath, StepWindow
    from ..sample import generate

    world = _control_world(size)
    prompt = "red striped circle moving right"
    extra = {}
    if control in ("steering", "both"):
        path = BoxTrack.parse("0: 0, 0, 0.5, 0.5\n1: 0.5, 0.5, 1, 1")
        extra["steering"] = [BoxSteering(path, world.text.token_roles(prompt, "red striped circle"))]
    if control in ("camera", "both"):
        extra.update(camera=CameraPath.constant(0.3, 0.1), camera_window=StepWindow(0.0, 1.0))
    return lambda steps: generate(world, [prompt], steps=steps, progress=lambda *_: None, **extra)


def sampling_step_seconds(control: str, steps: int = 10, size: int = 48) -> Callable[[], float]:
    """A function running one sampling with `control` and returning its seconds per sampling step (CFG).

    `size`: frame side. At 48 the clip has 2304 visual tokens against 512 text tokens, so self-attention
    outweighs the cross-attention that steering edits, as on real Wan (32760 against 512 at 480p, 81
    frames); smaller frames overstate steering's share of a step."""
    sample = _control_sampler(control, size)

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(steps)
        return (time.perf_counter() - t0) / steps

    return run


def sampling_peak_memory_mb(control: str, size: int = 48, steps: int = 4) -> float:
    """Peak resident memory (MB) above the resident memory before sampling that one sampling with `control`
    reaches (run it in a fresh process; Linux)."""
    import resource

    sample = _control_sampler(control, size)
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2 ** 20
    with torch.no_grad():
        sample(steps)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident


def run_control_perf(out: str | Path, steps: int = 10, size: int = 48, pairs: int = 5, command: str = "") -> dict:
    """`steps`: sampling steps per run; `pairs`: interleaved plain / controlled samplings per ratio."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timed = interleaved_ratios(sampling_step_seconds("plain", steps, size),
                               {c: sampling_step_seconds(c, steps, size) for c in ("steering", "camera", "both")},
                               pairs)
    memory = {c: _in_fresh_process(f"p.sampling_peak_memory_mb('{c}', {size})") for c in ("plain", "steering")}
    result = {"command": command, "model": PERF_WAN,
              "latent": f"[1, 16, 4, {size}, {size}] (20 world frames), text context 512",
              "threads": torch.get_num_threads(), "steps_per_run": steps, "pairs": pairs,
              "step_seconds": {"plain": timed["steering"]["baseline_cost"], **{c: v["cost"] for c, v in timed.items()}},
              "peak_memory_mb": memory,
              "ratios": {**{f"{c}_over_plain": v["median"] for c, v in timed.items()},
                         "steering_peak_memory_over_plain": memory["steering"] / memory["plain"]},
              "spread": {f"{c}_over_plain": v for c, v in timed.items()},
              "seconds": time.perf_counter() - t0}
    (out / "control_perf.json").write_text(json.dumps(result, indent=2))
    r, spread = result["ratios"], result["spread"]
    (out / "control_perf.md").write_text(
        f"Median ratio over {pairs} interleaved pairs of samplings [quartiles; range].\n\n"
        "| sampling step | ratio to plain |\n| --- | --- |\n"
        f"| box steering (all blocks, conditional pass; tau 0.3) | {_spread(spread['steering_over_plain'], 3)} |\n"
        f"| camera shift (a shift after every step) | {_spread(spread['camera_over_plain'], 3)} |\n"
        f"| both | {_spread(spread['both_over_plain'], 3)} |\n"
        f"| peak memory of a sampling with box steering / without | {r['steering_peak_memory_over_plain']:.3f} |\n")
    return result
