"""SynMotion's cost against what it replaces, as ratios (absolute times depend on the machine), on models loaded by
ComfyUI's own loader: the shipped shapes world and a small Wan 2.1 (random weights, Wan 2.1 1.3B's width and umt5's
4096-wide text; `dualreal_perf.py`'s).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/synmotion_perf.py --out out/synmotion_perf

- Training: SynMotion's steps over a plain motion LoRA step on the same backbone, batch (1), rank (64) and clips:
  the plain step is Train Motion LoRA's motion step without its alignment, appearance-debiased loss and spatial
  phase (plain MSE on v, o, ffn.0, ffn.2), as SynMotion's loss is plain MSE. SynMotion's motion step (a clip: both
  embeddings, the refiner and the LoRA on q, k, v learn), its prior step (a prior clip: the subject embedding alone
  learns, through the frozen LoRA), and the paper's 0.75 / 0.25 mix of the two (per pair, 0.75 times the motion
  step's ratio plus 0.25 times the prior step's: what a run's steps cost on average). Also a plain motion LoRA on
  SynMotion's q, k, v roles, to tell the roles' cost from the embeddings'. Seconds per step are the engine's, the
  first step of a run left out.
- Sampling: a KSampler run (euler, CFG 3) on the plain MODEL with the SynMotion conditioning (Apply SynMotion
  Embeddings' output on the world; `with_embeddings`, what that node calls, on Wan's padded 512-row conditioning,
  for which no tokenizer ships) over the same run with the plain conditioning, both under inference mode as
  ComfyUI runs nodes. The edit happens once, before sampling: the aim is at most 1.02.
- The edit itself: `with_embeddings` (the motion residual and the refiner on the motion words' rows) on a
  conditioning of each model's rows at 4096 wide, in milliseconds (median of repeated calls), and over one
  sampling step.
- Speed ratios come from interleaved runs (A B A B ..., `interleaved_ratios`): the median over adjacent pairs,
  with quartiles and range.

Writes synmotion_perf.json and synmotion_perf.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dualreal_perf import WAN, _setup  # noqa: E402  (the same models, loaded the same way)

# Per model: a clip's latent (and the sampled latent's) [C, T, H, W], the conditioning's rows (umt5 pads Wan's to 512),
# the prompt's words among them ("<subject> <motion>", the rest padding), the timed training and sampling steps per
# run (the world's steps are short: more of them, so a run outlasts the machine's short spells of other load).
SHAPES = {"world": dict(clip=(16, 1, 32, 32), text_tokens=16, words=5, train_steps=8, sample_steps=20),
          "wan": dict(clip=(16, 2, 24, 24), text_tokens=512, words=7, train_steps=3, sample_steps=3)}
# Where the subject and motion words sit in the prompt ("a red circle moving left": subject 1-2, motion 3-4).
SUBJECT, MOTION = (1, 2), (3, 4)
PRIOR_CLIPS = 4
RANK = 64
MIX = 0.75  # SynMotion's share of motion steps
EDIT_CALLS = 50
WORLD_PROMPT, WORLD_MOTION = "a blue square moving left", "moving left"  # the world's tokenizer: one token per word


def _conditioning(g: torch.Generator, count: int, shapes: dict, text_dim: int) -> torch.Tensor:
    """`count` prompts' conditioning: the words' rows random, the rest zero (padding, as umt5's)."""
    context = torch.zeros(count, shapes["text_tokens"], text_dim)
    context[:, :shapes["words"]] = torch.randn(count, shapes["words"], text_dim, generator=g)
    return context


def _data(model_name: str, text_dim: int):
    from custvid_pack.custvid_core.training import VideoSet
    from custvid_pack.custvid_core.training.prior_clips import PriorClips, PriorPrompt

    shapes = SHAPES[model_name]
    g = torch.Generator().manual_seed(0)
    clips = VideoSet(torch.randn(2, *shapes["clip"], generator=g), _conditioning(g, 2, shapes, text_dim))
    prior = PriorClips(torch.randn(PRIOR_CLIPS, *shapes["clip"], generator=g),
                       _conditioning(g, PRIOR_CLIPS, shapes, text_dim),
                       prompts=(PriorPrompt("a dog", "walking"),) * PRIOR_CLIPS, base_model="bench")
    phrase = torch.randn(len(MOTION), text_dim, generator=g)
    return clips, prior, phrase


def _trainers(patcher, model_name: str, steps: int):
    """Functions running a short training (`steps` timed steps after one left out) and returning its seconds per
    step: {"motion_lora", "qkv_lora", "synmotion_motion", "synmotion_prior"}; and one returning trained embeddings."""
    from custvid_pack.custvid_core.adapters.lora import SYNMOTION_MOTION_ROLES
    from custvid_pack.custvid_core.adapters.synmotion import LearnedSynMotion, RolePositions
    from custvid_pack.custvid_core.training import MotionSettings, OptimSettings, SynMotionSettings, train_motion
    from custvid_pack.custvid_core.training.synmotion import train_synmotion
    from custvid_pack.nodes.host import training_backbone

    clips, prior, phrase = _data(model_name, patcher.model.diffusion_model.text_embedding[0].in_features)
    optim = OptimSettings(steps=steps + 1, lr=1e-4, warmup=1, checkpoint_every=10 ** 6)
    plain = MotionSettings(rank=RANK, spatial_rank=0, debiased_weight=0.0, alignment_weight=0.0, optim=optim)
    positions = RolePositions(SUBJECT, MOTION)

    def synmotion(motion_probability: float, optim=optim):
        return SynMotionSettings(rank=RANK, motion_probability=motion_probability, optim=optim)

    def train_synmotion_on(backbone, settings, device, dtype):
        return train_synmotion(backbone, clips, positions, phrase, prior, settings, [SUBJECT[:1]] * PRIOR_CLIPS,
                               "bench", device=device, dtype=dtype)

    def seconds(history: list[dict], kind: str | None) -> float:
        timed = [r["seconds"] for r in history[1:] if kind is None or kind in r]
        return statistics.fmean(timed)

    def run(train, settings, kind=None):
        def timed() -> float:
            with training_backbone(patcher) as (backbone, device, _):
                history = train(backbone, settings, device=device, dtype=torch.float32).history
            return seconds(history, kind)
        return timed

    def motion_lora(backbone, settings, device, dtype):
        return train_motion(backbone, clips, settings, device=device, dtype=dtype)

    def trained(train_steps: int) -> LearnedSynMotion:
        with training_backbone(patcher) as (backbone, device, _):
            settings = synmotion(MIX, replace(optim, steps=train_steps, lr=1e-2, warmup=0))
            result = train_synmotion_on(backbone, settings, device, torch.float32)
        return LearnedSynMotion.from_exported(result.parts[SynMotionSettings().name])

    # Nearly all steps of one kind; the steps of the other kind, if any, are not counted.
    return {"motion_lora": run(motion_lora, plain),
            "qkv_lora": run(motion_lora, replace(plain, roles=SYNMOTION_MOTION_ROLES)),
            "synmotion_motion": run(train_synmotion_on, synmotion(0.99), kind="motion"),
            "synmotion_prior": run(train_synmotion_on, synmotion(0.01), kind="prior")}, trained


def _applied(model_name: str, conditioning: list, learned, text_dim: int) -> list:
    """The SynMotion conditioning: Apply SynMotion Embeddings' output with the world's text encoder; on Wan (no
    tokenizer here) `with_embeddings` at the motion words' rows, as that node calls it."""
    if model_name == "world":
        from custvid_pack.custvid_core.world.model import load_world
        from custvid_pack.nodes.synmotion_nodes import ApplySynMotionEmbeddings
        from custvid_pack.nodes.world_nodes import world_clip

        return ApplySynMotionEmbeddings.execute(conditioning, learned, world_clip(load_world().text), WORLD_PROMPT,
                                                WORLD_MOTION).result[0]
    from custvid_pack.custvid_core.adapters.synmotion import RolePositions, with_embeddings

    return [[with_embeddings(c, RolePositions(motion=MOTION), learned), dict(extras)] for c, extras in conditioning]


def _prompt(model_name: str, text_dim: int) -> list:
    if model_name == "world":
        from custvid_pack.custvid_core.world.model import load_world
        from custvid_pack.nodes.world_nodes import world_clip
        from world_data import encode

        return encode(world_clip(load_world().text), WORLD_PROMPT)
    return [[_conditioning(torch.Generator().manual_seed(1), 1, SHAPES[model_name], text_dim), {}]]


def _samplers(patcher, learned, model_name: str):
    """(plain conditioning, SynMotion conditioning): functions running a KSampler and returning its seconds per
    step, on the plain MODEL."""
    import nodes as comfy_nodes

    text_dim = patcher.model.diffusion_model.text_embedding[0].in_features
    with torch.inference_mode():
        plain = _prompt(model_name, text_dim)
        applied = _applied(model_name, plain, learned, text_dim)
    assert not torch.equal(applied[0][0], plain[0][0])  # the learned embeddings edit the conditioning
    negative = [[torch.zeros_like(plain[0][0]), {}]]
    latent = {"samples": torch.zeros(1, *SHAPES[model_name]["clip"])}

    def sampling(positive, steps: int):
        def timed() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                comfy_nodes.KSampler().sample(patcher, 0, steps, 3.0, "euler", "simple", positive, negative, latent)
            return (time.perf_counter() - t0) / steps
        return timed

    return lambda steps: sampling(plain, steps), lambda steps: sampling(applied, steps)


def edit_milliseconds(learned, text_tokens: int, calls: int = EDIT_CALLS) -> dict:
    """`with_embeddings` on a [1, text_tokens, 4096] conditioning: the median and quartiles of `calls` calls (ms),
    after one left out."""
    from custvid_pack.custvid_core.adapters.synmotion import RolePositions, with_embeddings

    context = _conditioning(torch.Generator().manual_seed(2), 1, dict(text_tokens=text_tokens, words=7),
                            learned.text_dim)
    times = []
    for i in range(calls + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            with_embeddings(context, RolePositions(motion=MOTION), learned)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "calls": calls, "conditioning": [1, text_tokens, learned.text_dim]}


def trainable_parameters(patcher, text_dim: int) -> dict:
    """Parameters each side trains: the plain motion LoRA's, SynMotion's LoRA's (q, k, v) and its embeddings' (the
    subject code and projection, the motion codes and projection, the refiner)."""
    from custvid_pack.custvid_core.adapters.lora import MOTION_ROLES, SYNMOTION_MOTION_ROLES
    from custvid_pack.custvid_core.adapters.synmotion import SynMotionEmbeddings
    from custvid_pack.custvid_core.backbones import describe

    backbone = describe(patcher.model.diffusion_model)

    def lora(roles) -> int:
        return sum(RANK * (m.in_features + m.out_features) for _, m in backbone.role_modules(roles))

    embeddings = SynMotionEmbeddings(len(MOTION), text_dim, torch.zeros(text_dim))
    return {"motion_lora": lora(MOTION_ROLES), "synmotion_lora": lora(SYNMOTION_MOTION_ROLES),
            **{f"synmotion_{name}": sum(p.numel() for p in module.parameters())
               for name, module in embeddings.named_children()}}


def _mix(motion: dict, prior: dict) -> dict:
    """The 0.75 / 0.25 mix's ratio per pair (pairs of the same round), with its spread."""
    ratios = [MIX * m + (1 - MIX) * p for m, p in zip(motion["pair_ratios"], prior["pair_ratios"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios), "pair_ratios": ratios}


def bench(model_name: str, folder: Path, pairs: int, sampling_pairs: int) -> dict:
    shapes = SHAPES[model_name]
    t0 = time.perf_counter()
    patcher = _setup(model_name, folder)
    from custvid_pack.custvid_core.world.bench.perf import interleaved_ratios

    trainers, trained = _trainers(patcher, model_name, shapes["train_steps"])
    baseline = trainers.pop("motion_lora")
    training = interleaved_ratios(baseline, trainers, pairs)
    training["synmotion_mix"] = _mix(training["synmotion_motion"], training["synmotion_prior"])
    learned = trained(4)
    plain, with_synmotion = _samplers(patcher, learned, model_name)
    steps = shapes["sample_steps"]
    sampling = interleaved_ratios(plain(steps), {"synmotion": with_synmotion(steps)}, sampling_pairs)["synmotion"]
    edit = {"wan_conditioning_512x4096": edit_milliseconds(learned, 512)}
    if shapes["text_tokens"] != 512:
        edit[f"this_models_conditioning_{shapes['text_tokens']}x{learned.text_dim}"] = \
            edit_milliseconds(learned, shapes["text_tokens"])
    edit_over_step = edit[next(reversed(edit))]["median"] / 1000 / sampling["baseline_cost"]

    backbone = patcher.model.diffusion_model
    return {"model": WAN if model_name == "wan" else "the shipped shapes world (custvid_core/world/weights)",
            "blocks": len(backbone.blocks), "dim": backbone.text_embedding[-1].out_features,
            "text_dim": learned.text_dim, **shapes,
            "ratios": {"synmotion_motion_step_over_motion_lora_step": training["synmotion_motion"]["median"],
                       "synmotion_prior_step_over_motion_lora_step": training["synmotion_prior"]["median"],
                       "synmotion_mix_step_over_motion_lora_step": training["synmotion_mix"]["median"],
                       "qkv_lora_step_over_motion_lora_step": training["qkv_lora"]["median"],
                       "synmotion_conditioning_sampling_over_plain": sampling["median"],
                       "edit_over_one_sampling_step": edit_over_step},
            "spread": {"synmotion_motion_step_over_motion_lora_step": training["synmotion_motion"],
                       "synmotion_prior_step_over_motion_lora_step": training["synmotion_prior"],
                       "synmotion_mix_step_over_motion_lora_step": training["synmotion_mix"],
                       "qkv_lora_step_over_motion_lora_step": training["qkv_lora"],
                       "synmotion_conditioning_sampling_over_plain": sampling},
            "edit_ms": edit, "trainable_parameters": trainable_parameters(patcher, learned.text_dim),
            "seconds": time.perf_counter() - t0}


def _markdown(result: dict) -> str:
    from custvid_pack.custvid_core.world.bench.perf import _spread

    names = (("synmotion_motion_step_over_motion_lora_step", "SynMotion motion step / motion LoRA step", 2),
             ("synmotion_prior_step_over_motion_lora_step", "SynMotion prior step / motion LoRA step", 2),
             ("synmotion_mix_step_over_motion_lora_step", "SynMotion 0.75/0.25 mix / motion LoRA step", 2),
             ("qkv_lora_step_over_motion_lora_step", "LoRA on q, k, v (no embeddings) / motion LoRA step", 2),
             ("synmotion_conditioning_sampling_over_plain", "sampling with the SynMotion conditioning / plain", 3))
    rows = []
    for name, r in result["models"].items():
        rows += [f"| {name} | {what} | {_spread(r['spread'][key], digits)} |" for key, what, digits in names]
        rows += [f"| {name} | the edit on [{', '.join(map(str, e['conditioning']))}] (ms) | {e['median']:.2f} "
                 f"[{e['q1']:.2f}, {e['q3']:.2f}] |" for e in r["edit_ms"].values()]
    return (f"Median ratio over {result['pairs']} interleaved pairs ({result['sampling_pairs']} for sampling) "
            f"[quartiles; range]; the edit: median of "
            f"{EDIT_CALLS} calls [quartiles].\n\n| model | measurement | value |\n| --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["world", "wan"])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs per training ratio")
    parser.add_argument("--sampling-pairs", type=int, default=15,
                        help="interleaved pairs for the sampling ratio (a ratio near 1 needs more)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "COMFYUI_PATH=... python benchmarks/synmotion_perf.py " + " ".join(sys.argv[1:])
    result = {"command": command, "threads": args.threads, "pairs": args.pairs, "sampling_pairs": args.sampling_pairs,
              "rank": RANK,
              "prior_clips": PRIOR_CLIPS, "motion_share": MIX,
              "models": {name: bench(name, out, args.pairs, args.sampling_pairs) for name in args.models}}
    (out / "synmotion_perf.json").write_text(json.dumps(result, indent=2))
    (out / "synmotion_perf.md").write_text(_markdown(result))
    print(json.dumps({name: {**r["ratios"], "edit_ms": {k: e["median"] for k, e in r["edit_ms"].items()}}
                      for name, r in result["models"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
