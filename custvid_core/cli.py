"""Command line: `python -m custvid_core <command>`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .errors import InputError
from .world.scene import WorldSpec

CONTROL_PARTS = ("perf", "camera", "boxes")


def demo(args: argparse.Namespace) -> int:
    """The main job: a clip from the shapes-world model, what the measurements see in it, and its
    motion and subject representations from the world's own RAFT and DINOv2."""
    from .eval.metrics import describe_clip
    from .media import contact_sheet, save_gif, save_mp4, save_png
    from .representations import motion, storage, subject
    from .world.encoders import DINO_FILE, RAFT_FILE
    from .world.model import load_world
    from .world.sample import generate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world()
    t0 = time.perf_counter()
    frames = generate(world, args.prompt, seed=args.seed, steps=args.steps, cfg=args.cfg)[0]
    seconds = time.perf_counter() - t0
    save_mp4(frames, out / "clip.mp4", fps=4, scale=8)
    save_gif(frames, out / "clip.gif", fps=4, scale=8)
    save_png(contact_sheet(frames, columns=frames.shape[0], scale=8), out / "contact_sheet.png")
    seen = describe_clip(frames)

    raft = motion.load_raft(RAFT_FILE)
    motion_rep = motion.extract_motion(raft, frames, seen.masks if seen.present_frames == 1 else None)
    storage.save_representation(motion_rep, out / "motion.safetensors")
    save_png(contact_sheet(motion.flow_preview(motion_rep), columns=frames.shape[0], scale=8), out / "flow_preview.png")
    dino = subject.load_dinov2(DINO_FILE)
    middle = int(seen.masks.sum((1, 2)).argmax())
    subject_rep = subject.extract_subject(dino, frames[middle:middle + 1],
                                          seen.masks[middle:middle + 1] if seen.masks[middle].any() else None,
                                          resolution=world.spec.size, fit="stretch")
    storage.save_representation(subject_rep, out / "subject.safetensors")

    summary = {
        "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
        "sampling_seconds": round(seconds, 2),
        "seen": {"colour": seen.colour, "shape": seen.shape, "direction": seen.direction,
                 "textured": seen.texture_contrast > 0.2, "object_in_frames": seen.present_frames},
        "motion_representation": {"mean_object_step": motion_rep.object_flow.mean(0).tolist(),
                                  "subject_from": motion_rep.subject_from},
        "subject_representation": {"grid": list(subject_rep.grid), "feature_dim": subject_rep.patch_tokens.shape[-1]},
        "model": world.info.get("command", ""),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"Wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


def world_spec_from_args(args: argparse.Namespace) -> WorldSpec:
    low, high = args.object_size
    if not 0 < low <= high < WorldSpec.size:
        raise InputError("object-size", f"'{low:g} {high:g}'", f"MIN MAX in pixels with 0 < MIN <= MAX < {WorldSpec.size}")
    return WorldSpec(wallpaper_contrast=args.wallpaper_contrast, object_size=(low, high))


def train_config_from_args(args: argparse.Namespace):
    from .world.train import TrainConfig

    return TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, layers=args.layers,
                       ffn=args.ffn, warmup=args.warmup, sigma_mean=args.sigma_mean, init=args.init,
                       sigma_sampling=args.sigma_sampling, heads=args.heads,
                       pan_fraction=args.pan_fraction, centred_jitter=args.centred_jitter,
                       init_from=args.init_from)


def world_train(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .world.train import train_world

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train_config_from_args(args)
    command = "python -m custvid_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train_world(args.out, cfg, world_spec_from_args(args), command=command)
    return 0


def world_eval(args: argparse.Namespace) -> int:
    from .world.evaluate import evaluate_vocabulary
    from .world.model import load_world, text_file_for

    if args.threads:
        torch.set_num_threads(args.threads)
    world = load_world(args.model, args.text or text_file_for(args.model))
    scores = evaluate_vocabulary(world, prompts=args.prompts, seeds=tuple(range(args.seeds)), steps=args.steps,
                                 cfg=args.cfg, shift=args.shift)
    print(json.dumps(scores.as_dict(), indent=2))
    return 0


def world_encoders(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .world import encoders

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m custvid_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = {"command": command}
    if args.raft_steps:
        cfg = encoders.RaftTrainConfig(steps=args.raft_steps, seed=args.seed)
        raft = encoders.train_world_raft(cfg)
        report["raft"] = {"train": cfg.__dict__, "quality": encoders.raft_quality(raft)}
        encoders.save_world_raft(raft, out / encoders.RAFT_FILE.name, {"command": command, **report["raft"]})
        print(json.dumps(report["raft"], indent=2))
    if args.dino_steps:
        cfg = encoders.DinoTrainConfig(steps=args.dino_steps, seed=args.seed)
        dino = encoders.train_world_dino(cfg)
        report["dino"] = {"train": cfg.__dict__, "quality": encoders.dino_quality(dino)}
        encoders.save_world_dino(dino, out / encoders.DINO_FILE.name, {"command": command, **report["dino"]})
        print(json.dumps(report["dino"], indent=2))
    (out / "encoders_report.json").write_text(json.dumps(report, indent=2))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    run_bench(args.cases, args.out, [m.strip() for m in args.methods.split(",")],
              [int(s) for s in args.seeds.split(",")])
    print((Path(args.out) / "results.md").read_text())
    return 0


def bench_control(args: argparse.Namespace) -> int:
    from .control.camera import StepWindow
    from .perf import run_control_perf
    from .world.control_bench import ControlBenchSettings, run_control_bench
    from .world.model import MODEL_FILE, load_world, text_file_for

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(CONTROL_PARTS):
        raise InputError("parts", f"'{args.parts}'", f"a comma-separated selection of {', '.join(CONTROL_PARTS)}")
    try:
        window = StepWindow(*(float(v) for v in args.camera_window.split(",")))
    except (TypeError, ValueError):
        raise InputError("camera-window", f"'{args.camera_window}'", "START,END as fractions of the steps, "
                         "0 <= START < END <= 1") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if "perf" in parts:
        perf = run_control_perf(args.out)
        print(json.dumps(perf["ratios"], indent=2))
    if parts & {"camera", "boxes"}:
        model = Path(args.model or MODEL_FILE)
        world = load_world(model, text_file_for(model))
        settings = ControlBenchSettings(prompts=args.prompts, seeds=tuple(int(s) for s in args.seeds.split(",")),
                                        steps=args.steps, window=window, parts=tuple(sorted(parts - {"perf"})))
        run_control_bench(world, args.out, settings)
    return 0


def bench_training(args: argparse.Namespace) -> int:
    from .perf import run_training_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_training_bench(args.out, args.steps)
    print(json.dumps(result["ratios"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m custvid_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate a clip with the shapes-world model and measure it")
    p.add_argument("--prompt", default="red striped circle moving right")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--out", default="out/demo", help="output folder")
    p.set_defaults(run=demo)

    p = sub.add_parser("world-train", help="pretrain the shapes-world base model")
    p.add_argument("--out", required=True, help="training folder (resumes if it holds a checkpoint)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=1, help="attention heads of 128 dims (model width = 128 * heads)")
    p.add_argument("--sigma-sampling", default="logit_normal", choices=["logit_normal", "shifted"],
                   help="noise levels: logit-normal, or uniform through the sampler's shift-3 schedule")
    p.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal timestep mean")
    p.add_argument("--pan-fraction", type=float, default=0.0,
                   help="fraction of clips whose camera pans (random direction, not in the prompt)")
    p.add_argument("--centred-jitter", type=float, default=-1.0,
                   help="pixels a path's midpoint may move from the frame's centre (negative: a start anywhere)")
    p.add_argument("--init", default="diffusers", choices=["diffusers", "adaln-zero"], help="weight initialisation")
    p.add_argument("--wallpaper-contrast", type=float, default=WorldSpec.wallpaper_contrast,
                   help="amplitude of the background's waves (what a camera pan is seen by)")
    p.add_argument("--object-size", type=float, nargs=2, default=WorldSpec.object_size, metavar=("MIN", "MAX"),
                   help="side of an object's box in pixels, drawn uniformly between MIN and MAX")
    p.add_argument("--init-from", default="", help="a world model file to start from (fine-tuning)")
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
    p = sub.add_parser("world-encoders", help="train the shapes world's RAFT and DINOv2 and report their quality")
    p.add_argument("--out", required=True)
    p.add_argument("--raft-steps", type=int, default=800, help="0 skips RAFT")
    p.add_argument("--dino-steps", type=int, default=800, help="0 skips DINOv2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=world_encoders)

    p = sub.add_parser("bench", help="measure customization methods on shapes-world cases")
    p.add_argument("--cases", default=str(Path(__file__).parent / "world" / "cases" / "default.json"))
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="base", help="comma-separated method names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=bench)

    p = sub.add_parser("bench-control", help="camera-shift and box-steering accuracy on the shapes world, and their "
                                             "sampling cost")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="", help="world model file (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", default="0,1", help="comma-separated sampling seeds")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--parts", default=",".join(CONTROL_PARTS),
                   help="what to measure: perf (sampling cost ratios), camera, boxes (comma-separated)")
    p.add_argument("--camera-window", default="0.2,0.4",
                   help="START,END: the part of the schedule the camera shifts in (MotionBooth: 0.2,0.4)")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=bench_control)

    p = sub.add_parser("bench-training", help="training speed and memory ratios (full objective vs plain LoRA, "
                                              "gradient checkpointing vs none)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=bench_training)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as e:  # a usage problem: the message, not a traceback
        parser.exit(2, f"error: {e}\n")
