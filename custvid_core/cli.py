"""Command line: `python -m custvid_core <command>`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _demo_clip(frames: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """A textured square crossing a striped background; returns frames, masks and its step (px/frame)."""
    g = torch.Generator().manual_seed(seed)
    side = size // 4
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    background = torch.stack([0.2 + 0.1 * ((xx // 6 + yy // 6) % 2), 0.25 + 0.0 * xx, 0.35 + 0.15 * ((xx // 4) % 2)], -1)
    texture = torch.rand(side, side, 1, generator=g) * 0.3 + torch.tensor([0.7, 0.2, 0.1])
    step = ((size - side - 8) / max(1, frames - 1), 0.5)
    clip = background.expand(frames, size, size, 3).clone()
    masks = torch.zeros(frames, size, size)
    for f in range(frames):
        x, y = int(round(4 + step[0] * f)), int(round(size // 3 + step[1] * f))
        clip[f, y:y + side, x:x + side] = texture
        masks[f, y:y + side, x:x + side] = 1.0
    return clip, masks, step


def demo(args: argparse.Namespace) -> int:
    from .media import contact_sheet, save_gif, save_png
    from .representations import motion, storage, subject

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip, masks, step = _demo_clip(args.frames, args.size, args.seed)
    save_gif(clip, out / "clip.gif", scale=2)

    torch.manual_seed(args.seed)
    if args.dino:
        dino = subject.load_dinov2(args.dino, "--dino")
    else:
        print("No --dino given: using a small DINOv2 with random weights (features show the plumbing only).")
        dino = subject.build_dinov2(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                         patch_size=14, image_size=224), name="random-dinov2")
    raft = motion.load_raft(args.raft, "--raft") if args.raft else motion.build_raft("raft_small")
    if not args.raft:
        print("No --raft given: using RAFT-small with random weights (flow shows the plumbing only).")

    t0 = time.perf_counter()
    subject_rep = subject.extract_subject(dino, clip[::4], masks[::4], resolution=224)
    t1 = time.perf_counter()
    motion_rep = motion.extract_motion(raft, clip, masks, iterations=args.iterations)
    t2 = time.perf_counter()

    storage.save_representation(subject_rep, out / "subject.safetensors")
    storage.save_representation(motion_rep, out / "motion.safetensors")
    save_png(contact_sheet(motion.flow_preview(motion_rep), columns=8), out / "flow_preview.png")
    true_step = [step[0] / args.size, step[1] / args.size]
    summary = {
        "clip": {"frames": args.frames, "size": args.size, "true_object_step": true_step},
        "subject": {"encoder": subject_rep.encoder, "images": subject_rep.patch_tokens.shape[0],
                    "grid": list(subject_rep.grid), "feature_dim": subject_rep.patch_tokens.shape[-1],
                    "seconds": round(t1 - t0, 3)},
        "motion": {"encoder": motion_rep.encoder, "pairs": motion_rep.flow.shape[0],
                   "mean_object_step": motion_rep.object_flow.mean(0).tolist(),
                   "trajectory_start_end": [motion_rep.trajectory[0].tolist(), motion_rep.trajectory[-1].tolist()],
                   "seconds": round(t2 - t1, 3)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"Wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def world_train(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .world.train import TrainConfig, train_world

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, layers=args.layers,
                      ffn=args.ffn, warmup=args.warmup, sigma_mean=args.sigma_mean)
    command = "python -m custvid_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train_world(args.out, cfg, command=command)
    return 0


def world_eval(args: argparse.Namespace) -> int:
    from .world.evaluate import evaluate_vocabulary
    from .world.model import load_world

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.model).parent
    world = load_world(args.model, args.text or out / "custvid_shapes_world_text.safetensors")
    scores = evaluate_vocabulary(world, prompts=args.prompts, seeds=tuple(range(args.seeds)), steps=args.steps,
                                 cfg=args.cfg, shift=args.shift)
    print(json.dumps(scores.as_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custvid_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="extract subject and motion representations from a generated clip")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--dino", help="DINOv2 weights (folder or file); random weights if omitted")
    p.add_argument("--raft", help="torchvision RAFT weights; random weights if omitted")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)

    p = sub.add_parser("world-train", help="pretrain the shapes-world base model")
    p.add_argument("--out", required=True, help="training folder (resumes if it holds a checkpoint)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal timestep mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=world_train)

    p = sub.add_parser("world-eval", help="colour / shape / direction rates of a world model")
    p.add_argument("--model", required=True)
    p.add_argument("--text")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=world_eval)
    args = parser.parse_args(argv)
    return args.run(args)
