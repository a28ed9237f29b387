"""The memory estimator's activation coefficients, measured, and the estimate checked against measured peaks.

    .venv/bin/python benchmarks/estimator_validation.py --fit                # the coefficients, from the fitting runs
    .venv/bin/python benchmarks/estimator_validation.py --out docs/results/estimator_validation.json

Each run trains a mid-size Wan (diffusers' model, random weights stored in bf16, bf16 autocast as on a GPU) for 3
steps of the subject or the motion recipe with their default parts (LoRA, alignment projector, region and token
attention losses, preservation clips; motion: spatial and motion LoRAs, MoRA, the debiased loss) in a fresh
process, and measures what training adds to the process's peak resident memory (Linux's VmHWM, reset just before,
less the resident memory then): the adapters, their optimizer state and the activations; the weights were resident
before. The estimate compared is `adapters_and_optimizer + activations` (the weights' part is a parameter count,
checked in tests/test_estimate.py).

`--fit`: runs on a model 512 wide with FFNs of 1024 and 3072, two clip lengths, with and without checkpointing;
non-negative least squares over what each run keeps (per token: blocks kept whole and the backward's working
block, each a width and an FFN term; and a fixed part) gives `ACTIVATION_BYTES_PER_TOKEN`.
The validation runs are other shapes (768 and 1024 wide, 6 and 4 blocks), lengths, batches and savings.

On a CPU the offload device is the compute device: offloaded activations and swapped weights stay in the measured
memory, so only what they force (a swapped block is recomputed) is measured here, not what they move.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custvid_core.backbones.estimate import (  # noqa: E402
    ACTIVATION_BYTES_PER_TOKEN,
    ADAPTER_BYTES_PER_PARAM,
    INPUT_BYTES,
    RECIPES,
    TrainingSetup,
    WanSize,
    adapter_params,
    estimate,
    recomputed_blocks,
)
from custvid_core.backbones.memory import MemorySettings  # noqa: E402

TEXT_LEN, DINO_WIDTH, HEAD_DIM = 512, 1024, 128


def wan_size(dim: int, ffn: int, layers: int) -> WanSize:
    return WanSize(f"wan-{dim}-{ffn}x{layers}", dim=dim, ffn_dim=ffn, heads=dim // HEAD_DIM, layers=layers)


def setup_of(run: dict) -> TrainingSetup:
    t, h, w = run["latent"]
    memory = MemorySettings(run.get("recompute_every", 1), False, run.get("blocks_to_swap", 0))
    return TrainingSetup(wan_size(run["dim"], run["ffn"], run["layers"]), height=8 * h, width=8 * w,
                         frames=4 * (t - 1) + 1, batch=run.get("batch", 1), recipe=run["recipe"],
                         rank=run.get("rank", 32), memory=memory, checkpointing=run["checkpointing"])


def _kilobytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(run: dict) -> int:
    """Bytes 3 training steps of `run` add to this process's peak resident memory."""
    from diffusers import WanTransformer3DModel

    from custvid_core.backbones import describe
    from custvid_core.training import MotionSettings, OptimSettings, SubjectSettings, VideoSet, train_motion
    from custvid_core.training.customize import train_subject
    from custvid_core.training.datasets import SubjectSet

    setup = setup_of(run)
    wan = setup.wan
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=wan.patch, num_attention_heads=wan.heads, attention_head_dim=HEAD_DIM,
                                  in_channels=16, out_channels=16, text_dim=wan.text_dim, freq_dim=wan.freq_dim,
                                  ffn_dim=wan.ffn_dim, num_layers=wan.layers, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", eps=1e-6).to(torch.bfloat16)
    backbone = describe(model)
    g = torch.Generator().manual_seed(0)
    t, h, w = run["latent"]
    n = 2 * setup.batch
    clips = torch.randn(n, 16, t, h, w, generator=g)
    context = torch.randn(n, TEXT_LEN, wan.text_dim, generator=g)
    optim = OptimSettings(steps=3, lr=1e-4, warmup=0)
    memory = setup.memory
    if setup.recipe == "subject":
        data = SubjectSet(torch.randn(n, 16, 1, h, w, generator=g), context, torch.rand(n, 1, 1, h, w, generator=g) > 0.5,
                          torch.randn(n, DINO_WIDTH, h // 2, w // 2, generator=g), VideoSet(clips, context),
                          subject_tokens=(1, 2))
        settings = SubjectSettings(rank=setup.rank, optim=optim, batch=setup.batch,
                                   gradient_checkpointing=setup.checkpointing, memory=memory)
        train = lambda: train_subject(backbone, data, settings, dtype=torch.bfloat16)  # noqa: E731
    else:
        data = VideoSet(clips, context, flow=torch.randn(n, 4 * (t - 1), 2, 8 * h, 8 * w, generator=g),
                        stills=torch.randn(n, 1, 16, 1, h, w, generator=g))
        settings = MotionSettings(rank=setup.rank, optim=optim, batch=setup.batch,
                                  gradient_checkpointing=setup.checkpointing, memory=memory)
        train = lambda: train_motion(backbone, data, settings, dtype=torch.bfloat16)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
    before = _kilobytes("VmRSS")
    train()
    return (_kilobytes("VmHWM") - before) * 1024


def measured(run: dict) -> int:
    """`measure(run)` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(run)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _runs(recipe: str, shapes, latents, settings) -> list[dict]:
    return [dict(recipe=recipe, dim=d, ffn=f, layers=n, latent=lat, **s)
            for d, f, n in shapes for lat in latents for s in settings]


FIT_RUNS = [r for recipe in ("subject", "motion") for r in _runs(
    recipe, [(512, 1024, 4), (512, 3072, 4)], [(3, 16, 32), (5, 32, 32)],
    [dict(checkpointing=False), dict(checkpointing=True)])]
VALIDATION_RUNS = [r for recipe in ("subject", "motion") for r in (
    _runs(recipe, [(768, 4480, 6)], [(3, 32, 48)],
          [dict(checkpointing=False), dict(checkpointing=True), dict(checkpointing=True, recompute_every=2),
           dict(checkpointing=True, blocks_to_swap=3)])
    + _runs(recipe, [(1024, 2816, 4)], [(3, 24, 32)], [dict(checkpointing=True, batch=2)]))]


def _features(run: dict) -> list[float]:
    """What each fitted coefficient multiplies in a run: per token, the blocks kept whole (width, FFN) and the working
    block (width, FFN); and 1 (memory the run needs whatever its size). A recomputed block's input is not fitted: it
    is the hidden states, `dim` values of 2 bytes a token (`INPUT_BYTES`)."""
    setup = setup_of(run)
    wan, tokens = setup.wan, setup.tokens() * setup.batch
    whole = wan.layers - len(recomputed_blocks(setup))
    return [whole * tokens * wan.dim, whole * tokens * wan.ffn_dim, tokens * wan.dim, tokens * wan.ffn_dim, 1.0]


def fit(results: list[dict]) -> dict:
    """Non-negative least squares of each recipe's runs: what training added less the adapters and their optimizer
    state and the recomputed blocks' inputs, over `_features`."""
    from scipy.optimize import nnls

    out = {}
    for recipe in RECIPES:
        rows = [r for r in results if r["run"]["recipe"] == recipe]
        if not rows:
            continue
        a = np.array([_features(r["run"]) for r in rows])
        b = np.array([r["measured_bytes"] - _fixed_parts(setup_of(r["run"])) for r in rows])
        scale = a.max(0)
        x, _ = nnls(a / scale, b)
        x = x / scale
        out[recipe] = {"kept": (round(x[0], 2), round(x[1], 2)), "working": (round(x[2], 2), round(x[3], 2)),
                       "fixed": int(x[4])}
    return out


def _fixed_parts(setup: TrainingSetup) -> int:
    tokens = setup.tokens() * setup.batch
    return (adapter_params(setup) * ADAPTER_BYTES_PER_PARAM
            + len(recomputed_blocks(setup)) * tokens * setup.wan.dim * INPUT_BYTES)


def _compared(run: dict, measured_bytes: int) -> dict:
    setup = setup_of(run)
    e = estimate(setup)
    estimated = e.adapters_and_optimizer + e.activations
    return {"run": run, "tokens": setup.tokens() * setup.batch, "measured_bytes": measured_bytes,
            "estimated_bytes": estimated, "error": estimated / measured_bytes - 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fit", action="store_true", help="measure the fitting runs and print the coefficients")
    parser.add_argument("--out", help="the validation's JSON")
    parser.add_argument("--measured", help="a JSON of this script's (or its output lines): the runs measured there are "
                                           "not measured again, their peaks compared with the estimate as it is now")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="the recipes whose runs to measure")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one run's bytes, in this process
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.measure:
        print(measure(json.loads(args.measure)))
        return 0
    t0 = time.perf_counter()
    known = {}
    if args.measured:
        text = Path(args.measured).read_text()
        earlier = json.loads(text)["runs"] if text.startswith("{\n") else [json.loads(x) for x in text.splitlines()
                                                                           if x.startswith('{"run"')]
        known = {json.dumps(r["run"], sort_keys=True): r["measured_bytes"] for r in earlier}
    results = []
    for run in [r for r in (FIT_RUNS if args.fit else VALIDATION_RUNS) if r["recipe"] in args.recipes.split(",")]:
        key = json.dumps(run, sort_keys=True)
        results.append(_compared(run, known[key] if key in known else measured(run)))
        print(json.dumps(results[-1]), flush=True)
    if args.fit:
        print(json.dumps({"ACTIVATION_BYTES_PER_TOKEN": fit(results)}))
        return 0
    errors = [abs(r["error"]) for r in results]
    summary = {"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
               "coefficients": ACTIVATION_BYTES_PER_TOKEN, "max_abs_error": max(errors),
               "median_abs_error": float(np.median(errors)), "runs": results, "seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"max |error| {max(errors):.1%}, median {np.median(errors):.1%} over {len(results)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
