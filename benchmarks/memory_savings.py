"""What each training memory saving costs in time and saves in memory, as ratios over the train nodes' default
(gradient checkpointing of every block), on a small Wan with random weights (absolute figures depend on the machine).

    .venv/bin/python benchmarks/memory_savings.py --out out/memory_savings

- The model: diffusers' Wan with 2 heads of 128 and an FFN of 1024 in 4 blocks; a plain motion LoRA step (rank 64
  on v, o, ffn.0, ffn.2; no spatial phase, no alignment) on clips of 3 latent frames of 16 x 16 (192 tokens), and for
  the peak memory of 5 frames of 32 x 32 (1280 tokens).
- The savings: no checkpointing, every 2nd block recomputed, the checkpointed activations offloaded to the CPU,
  2 of the 4 blocks swapped, every block swapped (`MemorySettings`).
- Speed: seconds per step from short runs interleaved with the default's (A B A C ..., `interleaved_ratios`), the
  first step of each run left out; the median over adjacent pairs with quartiles and range. On a CPU the seconds
  are the process's CPU time (all threads), as wall-clock time on a machine shared with other work varies many-fold.
- Peak memory: each in a fresh process, the peak resident memory (Linux's VmHWM, reset just before) above the
  resident memory before training: CPU memory, the whole process's.
- On a machine without a GPU the offload device is the compute device: a swap moves nothing, so its ratio is the
  cost of its bookkeeping and of the recomputation it forces, not of copies; offloading activations copies them
  within CPU memory. With a GPU (`--device cuda`) both are measured as users meet them.

Writes memory_savings.json and memory_savings.md in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custvid_core.backbones import describe  # noqa: E402
from custvid_core.training import MemorySettings, MotionSettings, OptimSettings, VideoSet, train_motion  # noqa: E402
from custvid_core.world.bench.perf import interleaved_ratios  # noqa: E402

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=1024, num_layers=4, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6)
CLIP = (16, 3, 16, 16)
PEAK_CLIP = (16, 5, 32, 32)  # longer: the activations, not the weights, set the peak
# name -> (gradient checkpointing, memory settings); the first is the baseline.
SIDES = {
    "checkpointing_every_block": (True, MemorySettings()),
    "no_checkpointing": (False, MemorySettings()),
    "every_2nd_block": (True, MemorySettings(recompute_every=2)),
    "activations_offloaded": (True, MemorySettings(offload_activations=True)),
    "2_of_4_blocks_swapped": (True, MemorySettings(blocks_to_swap=2)),
    "every_block_swapped": (True, MemorySettings(blocks_to_swap=4)),
}


def _setup(device: str, clip: tuple[int, ...] = CLIP):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    backbone = describe(WanTransformer3DModel(**MODEL).to(device))
    g = torch.Generator().manual_seed(0)
    clips = VideoSet(torch.randn(2, *clip, generator=g), torch.randn(2, 16, MODEL["text_dim"], generator=g))
    return backbone, clips


def _train(backbone, clips, side: str, steps: int, device: str, progress=None) -> list[dict]:
    checkpointing, memory = SIDES[side]
    settings = MotionSettings(spatial_rank=0, alignment_weight=0.0, debiased_weight=0.0,
                              optim=OptimSettings(steps=steps, lr=1e-4, warmup=0),
                              gradient_checkpointing=checkpointing,
                              memory=replace(memory, offload_device="cpu"))
    return train_motion(backbone, clips, settings, progress=progress, device=torch.device(device)).history


def step_seconds(backbone, clips, side: str, steps: int, device: str):
    """A run of `steps` + 1 steps giving its seconds per step after the first: on a GPU wall-clock seconds, on a CPU
    the process's CPU seconds (every thread's), which a machine shared with other work disturbs far less."""
    clock = time.perf_counter if device == "cuda" else time.process_time

    def run() -> float:
        marks = []

        def mark(step, total, record):
            if device == "cuda":
                torch.cuda.synchronize()
            if step in (1, total):
                marks.append(clock())

        _train(backbone, clips, side, steps + 1, device, mark)
        return (marks[1] - marks[0]) / steps
    return run


def _kilobytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_memory_mb(side: str, device: str) -> float:
    """The peak memory 2 training steps add: the GPU's allocator peak with a GPU, else the process's resident peak."""
    backbone, clips = _setup(device, PEAK_CLIP)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _train(backbone, clips, side, 2, device)
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
    before = _kilobytes("VmRSS")
    _train(backbone, clips, side, 2, device)
    return (_kilobytes("VmHWM") - before) / 1024


def _fresh_peak(side: str, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--peak", side, "--device", device, "--threads",
                          str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # one side's peak, in this process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak:
        print(peak_memory_mb(args.peak, args.device))
        return 0
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone, clips = _setup(args.device)
    runs = {side: step_seconds(backbone, clips, side, args.steps, args.device) for side in SIDES}
    baseline = next(iter(SIDES))
    timed = interleaved_ratios(runs.pop(baseline), runs, args.pairs)
    peaks = {side: _fresh_peak(side, args.device) for side in SIDES}
    result = {"command": " ".join(sys.argv), "device": args.device, "threads": torch.get_num_threads(),
              "model": MODEL, "clip_latent": CLIP, "peak_clip_latent": PEAK_CLIP, "baseline": baseline,
              "steps_per_run": args.steps,
              "pairs": args.pairs, "step_seconds_baseline": statistics.median(v["baseline_cost"] for v in timed.values()),
              "time_over_baseline": {k: v["median"] for k, v in timed.items()}, "spread": timed,
              "peak_memory_mb": peaks, "peak_memory_over_baseline": {k: v / peaks[baseline] for k, v in peaks.items()},
              "seconds": time.perf_counter() - t0}
    (out / "memory_savings.json").write_text(json.dumps(result, indent=2))
    lines = [f"On {args.device} ({torch.get_num_threads()} threads), over {baseline}: median step-time ratio of "
             f"{args.pairs} interleaved pairs [quartiles]; peak memory ratio.", "",
             "| saving | time per step | peak memory |", "| --- | --- | --- |"]
    for side in SIDES:
        t = timed.get(side)
        time_cell = "1" if t is None else f"{t['median']:.2f} [{t['q1']:.2f}, {t['q3']:.2f}]"
        lines.append(f"| {side} | {time_cell} | {result['peak_memory_over_baseline'][side]:.2f} |")
    (out / "memory_savings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
