"""CustVid's subject LoRA training step vs ComfyUI's own TrainLoraNode, on the same ComfyUI Wan model,
rank and batch, in one process (a ratio; absolute times depend on the machine).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_training.py --out out/bench_training

The model is a Wan 2.1 file with random weights (2 heads of 128, 8 blocks) loaded by ComfyUI's own
loader. Per-step time = (time of an N-step run - time of a 1-step run) / (N - 1), so set-up is
excluded for both. Both run in fp32 with gradient checkpointing. Writes comfy_training.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--side", type=int, default=32, help="latent side (pixels / 8 on Wan)")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")

    from comfy_host import import_comfy, import_pack

    import_comfy()
    import comfy.sd
    import folder_paths
    from comfy_extras.nodes_train import TrainLoraNode
    from diffusers import WanTransformer3DModel

    from custvid_core.backbones.wan import diffusers_to_native_key
    from custvid_core.files import save_safetensors

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out / "comfy_output"))
    torch.manual_seed(0)
    model = WanTransformer3DModel(**MODEL)
    save_safetensors(out / "bench_wan.safetensors",
                     {"model.diffusion_model." + diffusers_to_native_key(k): v for k, v in model.state_dict().items()})
    patcher = comfy.sd.load_diffusion_model(str(out / "bench_wan.safetensors"))
    import_pack()
    from custvid_pack.custvid_core.training import SubjectSet
    from custvid_pack.nodes.host import enable_rope_backward
    from custvid_pack.nodes.training_nodes import TrainSubjectLoRA

    # With comfy-kitchen installed, TrainLoraNode cannot backpropagate through Wan's fused RoPE on its own;
    # CustVid's registered backward lets both run.
    enable_rope_backward()

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 1, args.side, args.side, generator=g)
    context = torch.randn(1, 32, 4096, generator=g)

    def comfy_run(steps):
        t0 = time.perf_counter()
        TrainLoraNode.execute(model=[patcher], latents=[{"samples": latents}], positive=[[[context, {}]]],
                              batch_size=[1], steps=[steps], grad_accumulation_steps=[1], learning_rate=[1e-4],
                              rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                              training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
                              gradient_checkpointing=[True], existing_lora=["[None]"], bucket_mode=[False])
        return time.perf_counter() - t0

    def ours_run(steps, roles, run):
        data = SubjectSet(latents, context)
        t0 = time.perf_counter()
        TrainSubjectLoRA.execute(patcher, data, steps=steps, learning_rate=1e-4, rank=args.rank, roles=roles,
                                 batch_size=1, alignment_weight=0.0, alignment_block=3, timestep_sampling="uniform",
                                 shift=1.0, gradient_checkpointing=True, training_seed=0, checkpoint_every=10 ** 6,
                                 run_name=f"{run}_{steps}_{time.time_ns()}", preservation_weight=0.0,
                                 region_loss=False)
        return time.perf_counter() - t0

    def per_step(run):
        run(1)  # warm-up (first load, allocations)
        return (run(args.steps) - run(1)) / (args.steps - 1)

    subject_roles = "self_attn.q, self_attn.k, cross_attn.q, cross_attn.k, ffn.0"
    all_roles = ", ".join(f"{a}.{r}" for a in ("self_attn", "cross_attn") for r in "qkvo") + ", ffn.0, ffn.2"
    result = {"model": MODEL, "latent": [1, 16, 1, args.side, args.side], "rank": args.rank, "batch": 1,
              "threads": torch.get_num_threads(), "steps": args.steps,
              "seconds_per_step": {"comfyui_train_lora_node": per_step(comfy_run),
                                   "custvid_subject_roles": per_step(lambda n: ours_run(n, subject_roles, "s")),
                                   "custvid_all_roles": per_step(lambda n: ours_run(n, all_roles, "a"))}}
    s = result["seconds_per_step"]
    result["ratios"] = {"custvid_subject_roles_over_comfyui": s["custvid_subject_roles"] / s["comfyui_train_lora_node"],
                        "custvid_all_roles_over_comfyui": s["custvid_all_roles"] / s["comfyui_train_lora_node"]}
    (out / "comfy_training.json").write_text(json.dumps(result, indent=2))
    (out / "comfy_training.md").write_text(
        "| CustVid step / ComfyUI TrainLoraNode step (same model, rank, batch) | ratio |\n| --- | --- |\n"
        f"| CustVid, subject roles (q, k, ffn.0) | {result['ratios']['custvid_subject_roles_over_comfyui']:.2f} |\n"
        f"| CustVid, all ten roles | {result['ratios']['custvid_all_roles_over_comfyui']:.2f} |\n")
    print(json.dumps(result["seconds_per_step"], indent=2), json.dumps(result["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
