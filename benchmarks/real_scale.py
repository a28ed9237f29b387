"""Training at real size: seconds per step, peak device memory and tokens per second of the subject and the motion
recipe on Wan 2.1 1.3B and 14B and Wan 2.2 5B at full size, with random weights (nothing is downloaded).

    python benchmarks/real_scale.py --out out/real_scale              # the default set, one GPU, under 8 minutes
    python benchmarks/real_scale.py --only 'wan2.1-1.3b_*' --out ...  # configurations by name (shell patterns)
    python benchmarks/real_scale.py --plan                            # the set, its FLOPs and the estimator's peaks
    python benchmarks/real_scale.py --tiny --out ...                  # the same code on tiny models, on the CPU

Needs ComfyUI (`COMFYUI_PATH`): the model is ComfyUI's own `WanModel` with its manual-cast layers, the model the train
nodes get from UNETLoader, so an fp8 base is handled as there: the blocks' linear weights are stored in fp8 and each
layer casts its weight to bf16 as it runs (`WanBackbone.casts_weights`). The model is built on the "meta" device and
materialised on the GPU in its storage dtypes, then filled with random values there (a 14B never passes through host
memory). Every run computes in bf16. ComfyUI's own memory management (its partial loading) takes no part: the model
sits on the GPU whole, less the blocks the library's block swap keeps in host memory.

Each configuration (a `TrainingSetup` of the memory estimator: model, precision, recipe, 480x832 x 33 or 81 frames,
LoRA rank 32, gradient checkpointing of every or every 2nd block, blocks swapped, activations offloaded) trains the
library's recipe through `engine.run`, with the recipe's tasks and losses: subject (photos with SuRA and the
subject-token attention loss, the photos as moving clips, preservation clips; `customize.subject_recipe`) or motion
(spatial frames, then clips with MoRA and the appearance-debiased loss; `customize.motion_recipe`). Its data are random
latents, text conditioning (umT5's 512 x 4096), masks, DINOv2-L tokens and RAFT flow of the right shapes. A photo or
a spatial frame is one latent frame, so the recipes' steps differ in cost: the JSON gives each task's median, the
median of all timed steps (what a progress bar's s/it shows) and that of the steps on clips (what the goals judge).

Measured per configuration: seconds per step (wall clock after `torch.cuda.synchronize`, the median of the timed steps
that follow the warm-up steps), peak device memory over the timed steps (`torch.cuda.max_memory_allocated` and
`max_memory_reserved`, reset after the warm-up: the reserved figure is what a card must hold, CUDA's own context
aside), tokens per second, the FLOPs a step does and the throughput that makes, and the estimator's predicted peak
(`backbones.estimate`) beside the measured one. A configuration the estimator says will not fit the device (its
memory, or `--device-gib`) is skipped with the estimator's reason. Once the time budget (`--budget-s`) is spent the
run stops, inside a configuration too, and the JSON keeps what was measured; it is rewritten after each configuration.

Time of the default set on one H100, from FLOPs: a forward does 2 FLOPs per weight per token in the linear layers and
4 x tokens x width FLOPs per token in each self-attention (`step_flops`); a training step of a frozen base with
LoRAs is counted as 3 forwards (the backward computes the gradients of the activations, not of the weights, but
attention's backward costs about twice its forward) plus one forward for the blocks recomputed under checkpointing,
and swapped blocks add their weights' copy to the GPU twice a step (forward and recomputation) at 20 GB/s where
compute does not hide it. At 400 TFLOP/s (40% of the H100's dense bf16 peak) `--plan` gives, for 6 steps per
configuration (2 warm-up, 4 timed) shared among the tasks as the recipes' schedules share them (`task_shares`): the
1.3B subject goal at 33 frames 0.7 s per clip step (290 TFLOP), the 14B fp8 motion goal at 81 frames 17 s per clip
step (6.7 PFLOP; about 55 s for each 14B motion run at 81 frames and 77 s for the subject one, the biggest shares),
the whole default set about 260 s of steps, plus building each model
(seconds; a 14B's random fill is about 1 s on the GPU, pinning its swapped blocks' host copies a few seconds) and
ComfyUI's import. The budget's default, 420 s from the start (ComfyUI's import included), stops it under 8 minutes
whatever the GPU does: past the budget at most one configuration's model build, data and one step run on (about 30 s
for a 14B at 81 frames).

Writes real_scale.json in --out and prints it.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

from custvid_core.backbones import describe  # noqa: E402
from custvid_core.backbones.estimate import GIB, PROJECTOR_OUT, TrainingSetup, WanSize, estimate  # noqa: E402
from custvid_core.backbones.memory import MemorySettings  # noqa: E402
from custvid_core.backbones.wan import ROLES  # noqa: E402
from custvid_core.files import atomic_path  # noqa: E402
from custvid_core.training import (  # noqa: E402
    MotionSettings,
    MovingClips,
    OptimSettings,
    SubjectSet,
    SubjectSettings,
    VideoSet,
)
from custvid_core.training.customize import motion_recipe, subject_recipe  # noqa: E402
from custvid_core.training.engine import run  # noqa: E402
from custvid_core.training.tasks import Task, each_task  # noqa: E402

RANK = 32
COMPUTE_DTYPE = torch.bfloat16
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
DINO_GRID = 37  # DINOv2's patch grid at 518 pixels; its width is the estimator's (DINOv2-L)
SUBJECT_TOKENS = (1, 2)  # where the trigger words sit in the prompt
ITEMS = 2  # photos, clips
ASSUMED_TFLOPS = 400.0  # for --plan's time estimate: 40% of an H100's dense bf16 peak
SWAP_GB_PER_S = 20.0  # pinned host-to-GPU copies, for --plan

# Tiny Wan shapes for --tiny: one with Wan 2.2 5B's latents (48 channels, 16x downsampling), and a wider one that a
# small --device-gib leaves out.
TINY_SIZES = {
    "tiny": WanSize("tiny", dim=64, ffn_dim=128, heads=2, layers=4, text_len=16, text_dim=64, freq_dim=32),
    "tiny-5b-latents": WanSize("tiny-5b-latents", dim=64, ffn_dim=128, heads=2, layers=4, in_channels=48,
                               out_channels=48, vae_stride=(4, 16, 16), text_len=16, text_dim=64, freq_dim=32),
    "tiny-wide": WanSize("tiny-wide", dim=256, ffn_dim=1024, heads=2, layers=4, text_len=16, text_dim=64, freq_dim=32),
}


def _setup(size: str | WanSize, precision: str, recipe: str, frames: int, height: int = 480, width: int = 832,
           checkpointing: bool = True, **memory) -> TrainingSetup:
    return TrainingSetup(size, height=height, width=width, frames=frames, recipe=recipe, rank=RANK, precision=precision,
                         memory=MemorySettings(**memory), checkpointing=checkpointing)


# The default set, the goals' configurations first (`GOALS`).
DEFAULT_SET = [
    _setup("wan2.1-1.3b", "bf16", "subject", 33),
    _setup("wan2.1-14b", "fp8", "motion", 81, blocks_to_swap=32, offload_activations=True),
    _setup("wan2.1-14b", "fp8", "motion", 81, blocks_to_swap=32),
    _setup("wan2.1-1.3b", "bf16", "motion", 33),
    _setup("wan2.1-1.3b", "bf16", "subject", 33, recompute_every=2),
    _setup("wan2.1-1.3b", "bf16", "subject", 33, checkpointing=False),
    _setup("wan2.1-1.3b", "fp8", "subject", 33),
    _setup("wan2.1-1.3b", "bf16", "subject", 81),
    _setup("wan2.1-1.3b", "bf16", "motion", 81),
    _setup("wan2.1-1.3b", "bf16", "motion", 81, blocks_to_swap=15),
    _setup("wan2.2-5b", "bf16", "subject", 33),
    _setup("wan2.2-5b", "bf16", "motion", 81),
    _setup("wan2.1-14b", "bf16", "subject", 33),
    _setup("wan2.1-14b", "fp8", "subject", 81, blocks_to_swap=32, offload_activations=True),
]
TINY_SET = [
    _setup(TINY_SIZES["tiny"], "bf16", "subject", 9, 64, 96),
    _setup(TINY_SIZES["tiny"], "fp8", "motion", 9, 64, 96, blocks_to_swap=2),
    _setup(TINY_SIZES["tiny"], "bf16", "motion", 9, 64, 96, recompute_every=2, offload_activations=True),
    _setup(TINY_SIZES["tiny-5b-latents"], "bf16", "subject", 9, 64, 96),
    _setup(TINY_SIZES["tiny-wide"], "bf16", "subject", 17, 64, 96),
]


def config_name(setup: TrainingSetup) -> str:
    memory = setup.memory
    saving = f"ckpt{memory.recompute_every}" if setup.checkpointing else "nockpt"
    saving += f"_swap{memory.blocks_to_swap}" if memory.blocks_to_swap else ""
    saving += "_offload" if memory.offload_activations else ""
    return f"{setup.wan.name}_{setup.precision}_{setup.recipe}_{setup.height}x{setup.width}x{setup.frames}_{saving}"


# Each goal's limits on its configuration's measures. A step on a photo is one latent frame: the goals' seconds are
# those of the steps on clips.
GOALS = [
    {"goal": "Wan 2.1 1.3B subject LoRA at 480x832x33 on one H100", "config": config_name(DEFAULT_SET[0]),
     "at_most": {"seconds_per_clip_step": 1.5, "peak_reserved_gib": 16.0}},
    {"goal": "Wan 2.1 14B fp8 at 480x832x81 with block swap", "config": config_name(DEFAULT_SET[1]),
     "at_most": {"peak_reserved_gib": 24.0}},
]


# --- the model ---------------------------------------------------------------------------------------------------
def build_model(wan: WanSize, precision: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's WanModel of `wan`'s shape with random weights on `device`: built on "meta" in bf16, the blocks'
    linear weights given the precision's storage dtype (as the estimator counts them), then materialised on the
    device and filled there."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=wan.patch, text_len=wan.text_len, in_dim=wan.in_channels,
                     dim=wan.dim, ffn_dim=wan.ffn_dim, freq_dim=wan.freq_dim, text_dim=wan.text_dim,
                     out_dim=wan.out_channels, num_heads=wan.heads, num_layers=wan.layers, qk_norm=True,
                     cross_attn_norm=True, eps=1e-6, device="meta", dtype=torch.bfloat16,
                     operations=comfy.ops.manual_cast)
    storage = STORAGE_DTYPES[precision]
    for _, layer in describe(model).role_modules(ROLES):
        layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, dtype=storage), requires_grad=False)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms' scales and biases
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:  # drawn in fp32 and cast: fp8 has no random fill of its own
                p.copy_(torch.randn(p.shape, generator=g, device=device) * (p[0].numel() ** -0.5))
    return model.requires_grad_(False)


# --- the data -----------------------------------------------------------------------------------------------------
def recipe_data(setup: TrainingSetup, seed: int = 0) -> SubjectSet | VideoSet:
    """Random data of the shapes the recipe's data set has for this model and clip size (cached latents, umT5
    conditioning, masks on the latent grid, DINOv2-L tokens, RAFT flow at the frames' size, stills)."""
    wan = setup.wan
    g = torch.Generator().manual_seed(seed)
    t = (setup.frames - 1) // wan.vae_stride[0] + 1
    h, w = setup.height // wan.vae_stride[1], setup.width // wan.vae_stride[2]
    context = torch.randn(1, wan.text_len, wan.text_dim, generator=g)

    def latents(frames: int) -> torch.Tensor:
        return torch.randn(ITEMS, wan.in_channels, frames, h, w, generator=g)

    if setup.recipe == "motion":
        flow = torch.randn(ITEMS, setup.frames - 1, 2, setup.height, setup.width, generator=g)
        stills = torch.randn(ITEMS, 2, wan.in_channels, 1, h, w, generator=g)
        return VideoSet(latents(t), context, flow, stills)

    def masks(frames: int) -> torch.Tensor:  # the subject in the middle half of the frame
        m = torch.zeros(ITEMS, 1, frames, h, w)
        m[..., h // 4: h - h // 4, w // 4: w - w // 4] = 1.0
        return m

    dino = torch.randn(ITEMS, PROJECTOR_OUT["subject"], DINO_GRID, DINO_GRID, generator=g)
    return SubjectSet(latents(1), context, masks(1), dino, VideoSet(latents(t), context), SUBJECT_TOKENS, "sks dog",
                      MovingClips(latents(t), context, masks(t)))


def task_tokens(setup: TrainingSetup) -> dict[str, int]:
    """Tokens of one step of each task: one latent frame for photos and spatial frames, the clip for the others."""
    frame = replace(setup, frames=1).tokens()
    clip = setup.tokens()
    if setup.recipe == "subject":
        return {"photos": frame, "moving_clips": clip, "preservation": clip}
    return {"spatial": frame, "motion": clip}


def task_shares(setup: TrainingSetup) -> dict[str, float]:
    """The share of the steps each task takes in the recipe's schedule: the subject's photos or moving clips
    (`moving_share` of them) in turn with preservation clips; the motion's spatial frames in turn with clips."""
    if setup.recipe == "subject":
        moving = SubjectSettings().moving_share
        return {"photos": (1 - moving) / 2, "moving_clips": moving / 2, "preservation": 0.5}
    return {"spatial": 0.5, "motion": 0.5}


def step_flops(setup: TrainingSetup, tokens: int) -> float:
    """FLOPs of one training step on `tokens` tokens (see the module's docstring): 3 forwards, plus one for the
    blocks recomputed in backward."""
    wan, memory = setup.wan, setup.memory
    d, text = wan.dim, wan.text_len
    linear = 2 * tokens * (6 * d * d + 2 * d * wan.ffn_dim) + 2 * text * 2 * d * d  # cross-attention k, v on the text
    attention = 4 * tokens * tokens * d + 4 * tokens * text * d
    block = linear + attention
    recomputed = len({i for i in range(wan.layers) if setup.checkpointing and i % memory.recompute_every == 0}
                     | set(range(wan.layers - memory.blocks_to_swap, wan.layers)))
    return block * (3 * wan.layers + recomputed)


def planned_seconds(setup: TrainingSetup, tokens: int) -> float:
    """--plan's guess of one step's seconds: FLOPs at ASSUMED_TFLOPS, or the swapped weights' copies if slower."""
    wan = setup.wan
    swapped = setup.memory.blocks_to_swap * wan.block_linear_params() * (1 if setup.precision == "fp8" else 2)
    return max(step_flops(setup, tokens) / (ASSUMED_TFLOPS * 1e12), 2 * swapped / (SWAP_GB_PER_S * 1e9))


# --- one configuration --------------------------------------------------------------------------------------------
class OutOfTime(Exception):
    """The run's time budget is spent."""


def _noting(task: Task, ran: list[str]) -> Task:
    """`task`, noting its name in `ran` each time a step runs it."""
    def loss(g, ctx):
        ran.append(task.name)
        return task.loss(g, ctx)

    return replace(task, loss=loss)


def measure(setup: TrainingSetup, device: torch.device, steps: int, warmup: int, deadline: float) -> dict:
    """Train `warmup + steps` steps of `setup` and measure the timed ones (see the module's docstring)."""
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model = build_model(setup.wan, setup.precision, device)
    backbone = describe(model)
    data = recipe_data(setup)
    optim = OptimSettings(steps=warmup + steps, lr=1e-4, warmup=0, checkpoint_every=10 ** 9)
    if setup.recipe == "subject":
        settings = SubjectSettings(rank=setup.rank, optim=optim, gradient_checkpointing=setup.checkpointing,
                                   memory=setup.memory)
        recipe = subject_recipe(backbone, data, settings, optim.seed)
    else:
        settings = MotionSettings(rank=setup.rank, optim=optim, gradient_checkpointing=setup.checkpointing,
                                  memory=setup.memory)
        recipe = motion_recipe(backbone, data, settings, optim.seed)
    ran: list[str] = []
    recipe = each_task(recipe, lambda task: _noting(task, ran))
    built = time.perf_counter() - t0
    marks: list[float] = []

    def progress(step: int, total: int, record: dict) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if step == warmup and cuda:  # the peak of the timed steps only (the warm-up's allocations are cached)
            torch.cuda.reset_peak_memory_stats(device)
        if marks[-1] > deadline and step < total:
            raise OutOfTime

    stopped = None
    try:
        run(backbone, [recipe], recipe.schedule, optim, setup.checkpointing, progress=progress, device=device,
            dtype=COMPUTE_DTYPE, memory=setup.memory)
    except OutOfTime:
        stopped = "the time budget was spent"
    result: dict = {"build_seconds": built, "steps_run": len(marks)}
    if stopped:
        result["stopped"] = stopped
    timed = [(ran[i], marks[i] - marks[i - 1]) for i in range(warmup, len(marks))]
    if timed:
        tokens = task_tokens(setup)
        by_task = {name: [s for n, s in timed if n == name] for name in tokens}
        on_clips = [s for n, s in timed if tokens[n] == setup.tokens()]
        result.update({
            "timed_steps": len(timed),
            "seconds_per_step": statistics.median(s for _, s in timed),
            "seconds_per_clip_step": statistics.median(on_clips) if on_clips else None,
            "seconds_per_step_by_task": {n: statistics.median(v) for n, v in by_task.items() if v},
            "tokens_per_step_by_task": tokens,
            "tokens_per_second": sum(tokens[n] for n, _ in timed) / sum(s for _, s in timed),
            "achieved_tflops": sum(step_flops(setup, tokens[n]) for n, _ in timed) / sum(s for _, s in timed) / 1e12,
        })
        if cuda:
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
            result["peak_allocated_over_predicted"] = result["peak_allocated_gib"] * GIB / estimate(setup).peak
    del model, backbone, data, recipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def configuration(setup: TrainingSetup) -> dict:
    """What a result says about its configuration, and the estimator's prediction."""
    predicted = estimate(setup)
    return {"name": config_name(setup), "model": setup.wan.name, "precision": setup.precision, "recipe": setup.recipe,
            "height": setup.height, "width": setup.width, "frames": setup.frames, "rank": setup.rank,
            "checkpointing": setup.checkpointing, "recompute_every": setup.memory.recompute_every,
            "blocks_to_swap": setup.memory.blocks_to_swap, "offload_activations": setup.memory.offload_activations,
            "tokens_per_clip": setup.tokens(), "clip_step_tflop": step_flops(setup, setup.tokens()) / 1e12,
            "predicted_gib": {k: v / GIB for k, v in predicted.parts().items()}}


def goal_checks(results: list[dict], goals: list[dict] = GOALS) -> list[dict]:
    """Each goal with its configuration's measures and whether they are within its limits (None: not measured)."""
    by_name = {r["name"]: r for r in results}
    checks = []
    for goal in goals:
        measured = {k: by_name.get(goal["config"], {}).get(k) for k in goal["at_most"]}
        met = None if None in measured.values() else all(measured[k] <= v for k, v in goal["at_most"].items())
        checks.append({**goal, "measured": measured, "met": met})
    return checks


# --- the run ------------------------------------------------------------------------------------------------------
def _import_host(device: torch.device) -> None:
    """ComfyUI in this process (on the GPU unless the run is on the CPU) and the pack, for RoPE's backward."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("real_scale.py builds ComfyUI's WanModel: set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import; import_pack's later setting is moot)
    from comfy_host import import_pack

    import_pack()
    from custvid_pack.nodes.host import enable_rope_backward

    enable_rope_backward()


def _selected(catalogue: list[TrainingSetup], only: list[str] | None) -> list[TrainingSetup]:
    if not only:
        return catalogue
    patterns = [p for arg in only for p in arg.split(",") if p]
    chosen = [s for s in catalogue if any(fnmatch.fnmatchcase(config_name(s), p) for p in patterns)]
    if not chosen:
        names = "\n  ".join(config_name(s) for s in catalogue)
        sys.exit(f"--only {','.join(patterns)} matches no configuration; the configurations are:\n  {names}")
    return chosen


def plan(setups: list[TrainingSetup], steps: int, warmup: int) -> dict:
    """The set with each configuration's FLOPs, --plan's time guess and the estimator's peak."""
    rows, total = [], 0.0
    for setup in setups:
        tokens = task_tokens(setup)
        clip_task = max(tokens, key=tokens.get)
        seconds = (warmup + steps) * sum(share * planned_seconds(setup, tokens[n])
                                         for n, share in task_shares(setup).items())
        total += seconds
        rows.append({"name": config_name(setup), "clip_step_tflop": step_flops(setup, tokens[clip_task]) / 1e12,
                     "clip_step_seconds": planned_seconds(setup, tokens[clip_task]), "run_seconds": seconds,
                     "predicted_peak_gib": estimate(setup).peak / GIB})
    return {"assumed_tflops": ASSUMED_TFLOPS, "configurations": rows, "total_step_seconds": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/real_scale")
    parser.add_argument("--only", action="append", help="configuration names or shell patterns (comma-separated)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop once this many seconds have passed")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--device-gib", type=float, help="the device memory configurations must fit (default: the GPU's)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code in seconds")
    parser.add_argument("--plan", action="store_true", help="print the set's FLOPs, time guess and predicted peaks")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup: 1 or more (the first timed step is measured from the warm-up's end)")
    setups = _selected(TINY_SET if args.tiny else DEFAULT_SET, args.only)
    if args.tiny:  # tiny tensors gain nothing from threads, and on a busy machine their waits cost seconds a step
        torch.set_num_threads(1)
    if args.plan:
        print(json.dumps(plan(setups, args.steps, args.warmup), indent=2))
        return 0
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: the real sizes need a GPU (--tiny runs on the CPU)")
    started = time.perf_counter()
    deadline = started + args.budget_s
    _import_host(device)
    total_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    device_gib = args.device_gib or total_gib
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "device_total_gib": total_gib, "device_gib": device_gib, "torch": torch.__version__,
              "cuda": torch.version.cuda,
              "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "rank": RANK, "warmup_steps": args.warmup,
              "timed_steps": args.steps, "budget_s": args.budget_s, "configurations": []}

    def write() -> None:
        report["goals"] = goal_checks(report["configurations"])
        report["seconds"] = time.perf_counter() - started
        with atomic_path(out / "real_scale.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2))

    for setup in setups:
        result = configuration(setup)
        fits, reason = estimate(setup).fits(device_gib) if device_gib else (True, "")
        if not fits:
            result["skipped"] = f"the estimator says it does not fit: {reason}"
        elif time.perf_counter() > deadline:
            result["skipped"] = "the time budget was spent"
        else:
            try:
                result.update(measure(setup, device, args.steps, args.warmup, deadline))
            except Exception as e:  # recorded, and the next configuration runs: one failure spends no GPU time
                traceback.print_exc()
                result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            gc.collect()  # after the except block, whose exception held the failed run's tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["configurations"].append(result)
        print(json.dumps(result), flush=True)
        write()
    write()
    print(json.dumps(report["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
