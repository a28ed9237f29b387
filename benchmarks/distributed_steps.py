"""Seconds per training step on 1 and on 2 processes (accelerate's launcher, gloo on the CPUs), one CPU thread each,
the same global batch: what a second process costs and saves on this machine.

    .venv/bin/python benchmarks/distributed_steps.py --out docs/results

- The run: a motion LoRA (rank 16 on the motion roles, no spatial phase, no alignment) on diffusers' Wan with 2 heads
  of 64 and an FFN of 512 in 4 blocks, a global batch of 4 clips of 2 latent frames of 32 x 32, 7 steps. On 2
  processes each computes 2 of the 4 clips and DDP averages the gradients (`custvid_core.training.distributed`).
- Measured in every process from its backbone's forward calls: the time from step 2's forward to step 7's (5 whole
  steps; the first step, with the process group's and the optimizer's set-up, left out): CPU seconds (the process's,
  summed over the processes: the work the step costs) and wall-clock seconds (the main process's: how long a step
  takes).
- 1 and 2 processes run interleaved (1 2 1 2 ..., `interleaved_ratios`), each in fresh processes; the first pair is
  not counted; the median ratio over the pairs, with quartiles and range. The machine may be shared with other work:
  the wall-clock ratio is the more exposed to it.

With --fsdp: 2 processes under DDP against 2 under FSDP (`[distributed] strategy = "fsdp"`: each block sharded over
the processes), interleaved the same way, and the bytes of the blocks' weights each process holds while training;
writes distributed_fsdp_steps.json.

Writes distributed_steps.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custvid_core.world.bench.perf import interleaved_ratios  # noqa: E402

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
             text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4)
CLIPS, BATCH, STEPS, FIRST_TIMED = 8, 4, 7, 2


def _worker(out: Path, strategy: str) -> None:
    """One process of a run: train, and write this process's seconds per step and the bytes of the blocks' weights
    it holds (its shards under FSDP) to `out`.rank<RANK>.json."""
    from diffusers import WanTransformer3DModel

    from custvid_core.backbones import describe
    from custvid_core.training import MotionSettings, OptimSettings, VideoSet, train_motion
    from custvid_core.training.distributed import strategy_used

    torch.manual_seed(0)
    backbone = describe(WanTransformer3DModel(**MODEL).eval())
    g = torch.Generator().manual_seed(1)
    clips = VideoSet(torch.randn(CLIPS, 16, 2, 32, 32, generator=g), torch.randn(CLIPS, 5, 64, generator=g))
    marks = []
    forward = backbone.forward

    def timed_forward(*args, **kwargs):
        marks.append((time.process_time(), time.perf_counter()))
        out = forward(*args, **kwargs)  # the blocks' weights held after the forward, until the backward
        held.append(sum(getattr(p, "_local_tensor", p).nbytes for p in backbone.blocks.parameters()))
        return out

    held: list[int] = []

    backbone.forward = timed_forward
    settings = MotionSettings(rank=16, spatial_rank=0, alignment_weight=0.0, batch=BATCH,
                              optim=OptimSettings(steps=STEPS, lr=1e-4, warmup=1, checkpoint_every=100))
    with strategy_used(strategy):
        train_motion(backbone, clips, settings)
    (cpu0, wall0), (cpu1, wall1) = marks[FIRST_TIMED - 1], marks[-1]
    whole = len(marks) - FIRST_TIMED
    Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"cpu": (cpu1 - cpu0) / whole, "wall": (wall1 - wall0) / whole, "block_bytes": max(held)}))


def _run(processes: int, scratch: Path, seen: list[dict], strategy: str = "ddp"):
    """A function launching one run on `processes` processes and returning its CPU seconds per step."""

    def run() -> float:
        out = scratch / f"p{processes}_{strategy}_{len(seen)}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        launch = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        subprocess.run([*launch, __file__, "--worker", str(out), "--strategy", strategy], env=env, check=True,
                       capture_output=True)
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
        seen.append({"processes": processes, "strategy": strategy, "cpu": sum(r["cpu"] for r in ranks),
                     "wall": ranks[0]["wall"], "block_bytes_per_process": [r["block_bytes"] for r in ranks]})
        return seen[-1]["cpu"]

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "distributed_steps")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--fsdp", action="store_true", help="2 processes: DDP against FSDP")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.strategy)
        return 0
    seen: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = (_run(2, Path(scratch), seen), _run(2, Path(scratch), seen, "fsdp")) if args.fsdp else \
            (_run(1, Path(scratch), seen), _run(2, Path(scratch), seen))
        cpu = interleaved_ratios(runs[0], {"b": runs[1]}, args.pairs)["b"]
    counted = seen[2:]  # the first pair is the warm-up
    pairs = list(zip(counted[0::2], counted[1::2]))
    wall = sorted(two["wall"] / one["wall"] for one, two in pairs)
    ratio = "fsdp_over_ddp" if args.fsdp else "2_over_1"
    result = {"setup": {"model": MODEL, "batch": BATCH, "clip": [16, 2, 32, 32], "steps_timed": STEPS - FIRST_TIMED,
                        "threads_per_process": 1, "machine_cpus": os.cpu_count(), "torch": torch.__version__},
              f"cpu_seconds_per_step_ratio_{ratio}": cpu,
              f"wall_seconds_per_step_ratio_{ratio}": {"median": statistics.median(wall), "min": wall[0], "max": wall[-1],
                                                       "pair_ratios": wall},
              "runs": seen}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "distributed_fsdp_steps.json" if args.fsdp else "distributed_steps.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
