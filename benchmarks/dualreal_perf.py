"""DualReal's cost against what it replaces, as ratios (absolute times depend on the machine), on models loaded by
ComfyUI's own loader: the shipped shapes world and a small Wan 2.1 (random weights, Wan 2.1 1.3B's width).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/dualreal_perf.py --out out/dualreal_perf

- Training: a DualReal step over an isolated LoRA step on the same backbone, batch (1) and data: DualReal's
  identity step (a photo) over a subject LoRA step (rank 32 on q, k, ffn.0), its motion step (a clip) over a
  motion LoRA step (rank 64 on v, o, ffn.0, ffn.2). Every loss is plain MSE (DualReal's own; the LoRA recipes'
  extra losses and phases off), the adapters' bottleneck is 64, the controller on, the motion adapters take a
  1024-wide image embedding (a CLIP ViT-H's). Seconds per step are the engine's, the first step left out.
- Sampling: a KSampler step (euler, CFG 3) on Apply DualReal's MODEL over one on the plain MODEL.
- Speed ratios come from interleaved runs (A B A B ..., `interleaved_ratios`): the median over adjacent pairs,
  with quartiles and range.
- Peak memory: each side in a fresh process, as the peak resident memory (Linux's VmHWM, reset just before) above
  the resident memory before the measured work: CPU memory, the whole process's (weights, activations, the
  optimiser's state, the allocator's slack). Training: a 4-step DualReal run against the isolated pair (a subject
  and a motion LoRA run of 4 steps each); sampling: 3 steps, the DualReal read from a file (nothing trained before
  in that process).

Writes dualreal_perf.json and dualreal_perf.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

# Wan 2.1 1.3B's block (12 heads of 128, FFN 8960) in 2 blocks; its latents' tokens outnumber the text's, as on Wan.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6)
# Per model: a photo's latent and a clip's (and the sampled latent's) [C, T, H, W], text tokens, and the timed
# training and sampling steps per run (the world's steps are short: more of them, so a run outlasts the machine's
# short spells of other load).
SHAPES = {"world": dict(photo=(16, 1, 32, 32), clip=(16, 1, 32, 32), text_tokens=16, train_steps=8, sample_steps=20),
          "wan": dict(photo=(16, 1, 24, 24), clip=(16, 2, 24, 24), text_tokens=64, train_steps=3, sample_steps=3)}
IMAGE_EMBEDDING = 1024
MEMORY_SIDES = ("lora_training", "dualreal_training", "plain_sampling", "dualreal_sampling")


def _setup(model_name: str, folder: Path):
    """ComfyUI in this process, the pack, and the model's ModelPatcher."""
    from comfy_host import import_comfy, import_pack

    import_comfy()
    import comfy.sd
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    import_pack()
    if model_name == "world":
        from custvid_pack.custvid_core.world.model import MODEL_FILE

        return comfy.sd.load_diffusion_model(str(MODEL_FILE))
    from custvid_pack.custvid_core.backbones.wan import diffusers_to_native_key
    from custvid_pack.custvid_core.files import save_safetensors
    from diffusers import WanTransformer3DModel

    path = folder / "bench_wan21.safetensors"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = WanTransformer3DModel(**WAN)
        save_safetensors(path, {"model.diffusion_model." + diffusers_to_native_key(k): v
                                for k, v in model.state_dict().items()})
    return comfy.sd.load_diffusion_model(str(path))


def _data(model_name: str, text_dim: int):
    from custvid_pack.custvid_core.training import SubjectSet, VideoSet
    from custvid_pack.custvid_core.training.dualreal import ImageEmbeddings

    shapes = SHAPES[model_name]
    g = torch.Generator().manual_seed(0)
    tokens = shapes["text_tokens"]
    subject = SubjectSet(torch.randn(3, *shapes["photo"], generator=g), torch.randn(1, tokens, text_dim, generator=g))
    clips = VideoSet(torch.randn(2, *shapes["clip"], generator=g), torch.randn(2, tokens, text_dim, generator=g))
    embeddings = ImageEmbeddings(torch.randn(2, IMAGE_EMBEDDING, generator=g), torch.randn(1, IMAGE_EMBEDDING, generator=g))
    return subject, clips, embeddings


def _trainers(patcher, model_name: str, steps: int):
    """Functions running a short training (`steps` timed steps after one left out) and returning its seconds per
    step: {"lora_identity", "lora_motion", "dualreal_identity", "dualreal_motion"}; and one giving a DualReal."""
    from custvid_pack.custvid_core.training import MotionSettings, OptimSettings, SubjectSettings, train_motion, train_subject
    from custvid_pack.custvid_core.training.dualreal import DualRealSettings, dualreal_weights, train_dualreal
    from custvid_pack.nodes.host import training_backbone

    subject, clips, embeddings = _data(model_name, patcher.model.diffusion_model.text_embedding[0].in_features)
    optim = OptimSettings(steps=steps + 1, lr=1e-4, warmup=1, checkpoint_every=10 ** 6)
    lora_subject = SubjectSettings(optim=optim, region_loss=False, preservation_weight=0.0, alignment_weight=0.0,
                                   token_attention_weight=0.0)
    lora_motion = MotionSettings(optim=optim, spatial_rank=0, debiased_weight=0.0, alignment_weight=0.0)

    def dualreal(motion_probability: float, optim=optim):
        return DualRealSettings(motion_probability=motion_probability, optim=optim)

    def seconds(history: list[dict], kind: str | None = None) -> float:
        timed = [r["seconds"] for r in history[1:] if kind is None or kind in r]
        return sum(timed) / len(timed)

    def run(train, *args, kind=None):
        def timed() -> float:
            with training_backbone(patcher) as (backbone, device, _):
                history = train(backbone, *args, device=device, dtype=torch.float32).history
            return seconds(history, kind)
        return timed

    def trained(train_steps: int):
        with training_backbone(patcher) as (backbone, device, _):
            settings = dualreal(0.5, replace(optim, steps=train_steps))
            return dualreal_weights(train_dualreal(backbone, subject, clips, settings, embeddings, device=device,
                                                   dtype=torch.float32))

    def lora_pair():
        with training_backbone(patcher) as (backbone, device, _):
            for train, data, settings in ((train_subject, subject, lora_subject), (train_motion, clips, lora_motion)):
                train(backbone, data, replace(settings, optim=replace(optim, steps=4)), device=device,
                      dtype=torch.float32)

    # Nearly all steps of one kind; the steps of the other kind, if any, are not counted.
    return {"lora_identity": run(train_subject, subject, lora_subject),
            "lora_motion": run(train_motion, clips, lora_motion),
            "dualreal_identity": run(train_dualreal, subject, clips, dualreal(0.01), embeddings, kind="identity"),
            "dualreal_motion": run(train_dualreal, subject, clips, dualreal(0.99), embeddings, kind="motion")}, \
        trained, lora_pair


def _samplers(patcher, weights, model_name: str):
    """(plain, with DualReal): functions running a KSampler and returning its seconds per step."""
    import comfy.clip_vision
    from custvid_pack.nodes.dualreal_nodes import ApplyDualReal

    import nodes as comfy_nodes

    g = torch.Generator().manual_seed(1)
    text_dim = patcher.model.diffusion_model.text_embedding[0].in_features
    positive, negative = ([[torch.randn(1, SHAPES[model_name]["text_tokens"], text_dim, generator=g), {}]]
                          for _ in range(2))
    latent = {"samples": torch.zeros(1, *SHAPES[model_name]["clip"])}
    reference = comfy.clip_vision.Output()
    reference["image_embeds"] = torch.randn(1, IMAGE_EMBEDDING, generator=g)
    applied = ApplyDualReal.execute(patcher, weights, 1.0, clip_vision_output=reference).result[0]

    def sampling(model, steps: int):
        def timed() -> float:
            t0 = time.perf_counter()
            comfy_nodes.KSampler().sample(model, 0, steps, 3.0, "euler", "simple", positive, negative, latent)
            return (time.perf_counter() - t0) / steps
        return timed

    return lambda steps: sampling(patcher, steps), lambda steps: sampling(applied, steps)


def _kilobytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(model_name: str, side: str, folder: Path) -> tuple[float, float]:
    """Peak resident memory (MB) above the resident memory before `side`'s work (one of MEMORY_SIDES), and that
    resident memory (the model's weights, and the DualReal's as read from its file); run it in a fresh process
    (Linux)."""
    patcher = _setup(model_name, folder)
    if side.endswith("sampling"):  # the DualReal `bench` wrote: no training in this process before sampling
        from custvid_pack.custvid_core.adapters.dualreal import load_dualreal

        plain, with_dualreal = _samplers(patcher, load_dualreal(_dualreal_file(folder, model_name)), model_name)
        work = {"plain_sampling": plain(3), "dualreal_sampling": with_dualreal(3)}
    else:
        _, trained, lora_pair = _trainers(patcher, model_name, steps=3)
        work = {"lora_training": lora_pair, "dualreal_training": lambda: trained(4)}
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
    before = _kilobytes("VmRSS")
    work[side]()
    return (_kilobytes("VmHWM") - before) / 1024, before / 1024


def _dualreal_file(folder: Path, model_name: str) -> Path:
    return folder / f"bench_dualreal_{model_name}.safetensors"


def _memory_in_fresh_process(model_name: str, side: str, folder: Path, threads: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--memory", model_name, side, "--out", str(folder),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return tuple(float(v) for v in out.stdout.strip().splitlines()[-1].split())


def bench(model_name: str, folder: Path, pairs: int, threads: int) -> dict:
    shapes = SHAPES[model_name]
    t0 = time.perf_counter()
    patcher = _setup(model_name, folder)
    from custvid_pack.custvid_core.adapters.dualreal import save_dualreal
    from custvid_pack.custvid_core.world.bench.perf import interleaved_ratios

    trainers, trained, _ = _trainers(patcher, model_name, shapes["train_steps"])
    training = {kind: interleaved_ratios(trainers[f"lora_{kind}"], {kind: trainers[f"dualreal_{kind}"]}, pairs)[kind]
                for kind in ("identity", "motion")}
    weights = trained(1)
    save_dualreal(_dualreal_file(folder, model_name), weights)
    plain, with_dualreal = _samplers(patcher, weights, model_name)
    steps = shapes["sample_steps"]
    sampling = interleaved_ratios(plain(steps), {"dualreal": with_dualreal(steps)}, pairs)["dualreal"]
    memory = {side: dict(zip(("peak_above_start", "resident_at_start"),
                             _memory_in_fresh_process(model_name, side, folder, threads))) for side in MEMORY_SIDES}

    def memory_ratio(side: str, over: str, total: bool) -> float:
        def peak(m):
            return m["peak_above_start"] + (m["resident_at_start"] if total else 0.0)
        return peak(memory[side]) / peak(memory[over])

    backbone = patcher.model.diffusion_model
    return {"model": WAN if model_name == "wan" else "the shipped shapes world (custvid_core/world/weights)",
            "blocks": len(backbone.blocks), "dim": backbone.text_embedding[-1].out_features, **shapes,
            "ratios": {"dualreal_identity_step_over_subject_lora_step": training["identity"]["median"],
                       "dualreal_motion_step_over_motion_lora_step": training["motion"]["median"],
                       "dualreal_sampling_step_over_plain": sampling["median"],
                       **{f"{side}_{total}_peak_memory_over_{over}": memory_ratio(side, over, total == "process")
                          for side, over in (("dualreal_training", "lora_training"),
                                             ("dualreal_sampling", "plain_sampling"))
                          for total in ("added", "process")}},
            "spread": {"dualreal_identity_step_over_subject_lora_step": training["identity"],
                       "dualreal_motion_step_over_motion_lora_step": training["motion"],
                       "dualreal_sampling_step_over_plain": sampling},
            "memory_mb": memory, "seconds": time.perf_counter() - t0}


def _markdown(result: dict) -> str:
    from custvid_pack.custvid_core.world.bench.perf import _spread

    rows = []
    for name, r in result["models"].items():
        s, m = r["spread"], r["ratios"]
        rows += [f"| {name} | DualReal identity step / subject LoRA step | "
                 f"{_spread(s['dualreal_identity_step_over_subject_lora_step'])} |",
                 f"| {name} | DualReal motion step / motion LoRA step | "
                 f"{_spread(s['dualreal_motion_step_over_motion_lora_step'])} |",
                 f"| {name} | sampling step with Apply DualReal / plain | "
                 f"{_spread(s['dualreal_sampling_step_over_plain'], 3)} |"]
        for side, over, what in (("dualreal_training", "lora_training", "DualReal training / LoRA pair"),
                                 ("dualreal_sampling", "plain_sampling", "sampling with DualReal / plain")):
            added, process = (m[f"{side}_{total}_peak_memory_over_{over}"] for total in ("added", "process"))
            rows.append(f"| {name} | peak memory, {what}: added [whole process] | {added:.2f} [{process:.2f}] |")
    return (f"Median ratio over {result['pairs']} interleaved pairs [quartiles; range]. Memory: peak resident memory "
            "added by the work [the process's peak], each side in a fresh process.\n\n"
            "| model | measurement | ratio |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["world", "wan"])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs per ratio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory:
        print(*peak_memory_mb(args.memory[0], args.memory[1], out))
        return 0
    command = "COMFYUI_PATH=... python benchmarks/dualreal_perf.py " + " ".join(sys.argv[1:])
    result = {"command": command, "threads": args.threads, "pairs": args.pairs, "image_embedding": IMAGE_EMBEDDING,
              "models": {name: bench(name, out, args.pairs, args.threads)
                         for name in args.models}}
    (out / "dualreal_perf.json").write_text(json.dumps(result, indent=2))
    (out / "dualreal_perf.md").write_text(_markdown(result))
    print(json.dumps({name: r["ratios"] for name, r in result["models"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
