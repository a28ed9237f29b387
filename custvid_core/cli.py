"""Command line: `python -m custvid_core <command>`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .backbones.estimate import PRECISIONS, RECIPES, WAN_SIZES
from .errors import InputError
from .world.cases import DEFAULT_CASES
from .world.scene import WorldSpec

CONTROL_PARTS = ("perf", "camera", "boxes")
# The demo's default: the case and the ladder's rung that show customization best in a few minutes on a CPU
# (docs/results.md).
DEMO_CASE, DEMO_METHOD = "purple_heart_bounce", "full_moving"


def demo(args: argparse.Namespace) -> int:
    """The main job on the shapes world: learn a case's subject from its photos and its motion from its clips,
    then the same prompt from the base model and customized, side by side and measured."""
    from dataclasses import replace

    from .world.bench.methods import lora_methods
    from .world.cases import load_cases
    from .world.demo import run_demo
    from .world.model import load_world

    cases = {c.name: c for c in load_cases(args.cases)}
    if args.case not in cases:
        raise InputError("case", f"'{args.case}' is not in {args.cases}", f"one of {', '.join(cases)}")
    if args.training_steps < 1 or args.steps < 1:
        raise InputError("training-steps" if args.training_steps < 1 else "steps",
                         f"{min(args.training_steps, args.steps)}", "at least 1 step")
    methods = lora_methods(steps=args.training_steps)
    if args.method not in methods:
        raise InputError("method", f"'{args.method}' is not a LoRA method", f"one of {', '.join(methods)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    method = replace(methods[args.method], sampling_steps=args.steps, cfg=args.cfg)
    summary = run_demo(load_world(), cases[args.case], method, args.out, seed=args.seed)
    print(f"Seconds taken: {json.dumps(summary['seconds'])}")
    return 0


def _command_line() -> str:
    """This process's command, as written into results and weights' metadata."""
    import shlex
    import sys

    return "python -m custvid_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])


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
    from .world.train import train_world

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train_config_from_args(args)
    train_world(args.out, cfg, world_spec_from_args(args), command=_command_line())
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
    from .world import encoders

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = _command_line()
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
    from .world.bench.customization import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    run_bench(args.cases, args.out, [m.strip() for m in args.methods.split(",")],
              [int(s) for s in args.seeds.split(",")], sampling_steps=args.sampling_steps)
    print((Path(args.out) / "results.md").read_text())
    return 0


def bench_control(args: argparse.Namespace) -> int:
    from .control.camera import StepWindow
    from .world.bench.control import ControlBenchSettings, run_control_bench
    from .world.bench.perf import run_control_perf
    from .world.model import MODEL_FILE, load_world, text_file_for

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(CONTROL_PARTS):
        raise InputError("parts", f"'{args.parts}'", f"a comma-separated selection of {', '.join(CONTROL_PARTS)}")
    try:
        window = StepWindow(*(float(v) for v in args.camera_window.split(",")))
    except (TypeError, ValueError):
        raise InputError("camera-window", f"'{args.camera_window}'", "START,END as fractions of the steps, "
                         "0 <= START < END <= 1") from None
    if "perf" in parts and args.perf_pairs < 2:
        raise InputError("perf-pairs", f"{args.perf_pairs}", "at least 2 pairs of samplings (a spread needs two)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "perf" in parts:
        perf = run_control_perf(args.out, pairs=args.perf_pairs, command=_command_line())
        print(json.dumps(perf["ratios"], indent=2))
    if parts & {"camera", "boxes"}:
        model = Path(args.model or MODEL_FILE)
        world = load_world(model, text_file_for(model))
        settings = ControlBenchSettings(prompts=args.prompts, seeds=tuple(int(s) for s in args.seeds.split(",")),
                                        steps=args.steps, window=window, parts=tuple(sorted(parts - {"perf"})))
        run_control_bench(world, args.out, settings)
    return 0


def bench_training(args: argparse.Namespace) -> int:
    from .world.bench.perf import run_training_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_training_bench(args.out, args.steps, args.pairs, command=_command_line())
    print(json.dumps(result["ratios"], indent=2))
    return 0


def metrics(args: argparse.Namespace) -> int:
    from .control.boxes import BoxTrack
    from .control.camera import CameraPath
    from .eval.clip import load_clip
    from .eval.files import measure_files
    from .eval.measure import Encoders, Targets
    from .representations.motion import load_raft
    from .representations.subject import load_dinov2

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise InputError("batch-size", f"{args.batch_size}", "at least 1 image per encoder call")
    encoders = Encoders(clip=load_clip(args.clip, "--clip") if args.clip else None,
                        dino=load_dinov2(args.dino, "--dino") if args.dino else None,
                        raft=load_raft(args.raft, "--raft") if args.raft else None, batch_size=args.batch_size)
    if not (encoders.clip or encoders.dino or encoders.raft):
        raise InputError("--clip/--dino/--raft", "no encoder given", "at least one of the three model paths")
    targets = Targets(camera=CameraPath.parse(args.camera_path) if args.camera_path else None,
                      boxes=BoxTrack.parse(args.boxes) if args.boxes else None)
    measure_files(args.videos, args.out, encoders, targets, prompts=args.prompts, references=args.references,
                  reference_masks=args.reference_masks, reference_clips=args.reference_clips, command=_command_line())
    print((Path(args.out) / "results.md").read_text())
    return 0


# TrainingSetup's and MemorySettings' names for what `estimate` reads from its arguments.
_ESTIMATE_ARGUMENTS = {"model": "--model", "height": "--size", "width": "--size", "frames": "--frames",
                       "batch": "--batch", "recipe": "--recipe", "rank": "--rank", "precision": "--precision",
                       "recompute_every": "--recompute-every", "blocks_to_swap": "--blocks-to-swap"}


def estimate_memory(args: argparse.Namespace) -> int:
    """The peak device memory of a LoRA training run on a Wan model and its parts; or the README's table of what fits."""
    from .backbones.estimate import TrainingSetup, estimate, fit_table, table
    from .backbones.memory import MemorySettings

    if args.fit_table:
        print(fit_table())
        return 0
    try:
        height, width = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise InputError("--size", f"'{args.size}'", "HEIGHTxWIDTH in pixels, e.g. 480x832") from None
    try:
        setup = TrainingSetup(args.model, height, width, args.frames, args.batch, args.recipe, args.rank,
                              args.precision, MemorySettings(args.recompute_every, args.offload_activations,
                                                             args.blocks_to_swap),
                              args.encoders_loaded, not args.no_checkpointing)
    except InputError as e:  # named as the command line names it
        raise InputError(_ESTIMATE_ARGUMENTS.get(e.input_name, e.input_name), e.problem, e.expected) from None
    e = estimate(setup)
    if args.json:
        print(json.dumps({"tokens": setup.tokens(), **{k: v for k, v in e.parts().items()}}))
    else:
        print(table(e))
    if args.card:
        print(e.fits(args.card)[1])
    return 0


def train(args: argparse.Namespace) -> int:
    """Run a training config (custvid_core/training/config.py): tqdm progress with the loss and seconds per step;
    a rerun resumes the run's checkpoint."""
    from tqdm.auto import tqdm

    from .training.config import dry_run, load_config, train_from_config
    from .training.distributed import end_processes, is_main_process
    from .training.loop import TrainingStopped

    config = load_config(args.config, steps=args.steps)
    if args.dry_run:
        print(json.dumps(dry_run(config), indent=2))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    bars = []  # made at the first step, after the model is loaded and the data encoded (and from a resumed step)

    def progress(step: int, total: int, record: dict) -> None:
        if not bars:
            bars.append(tqdm(total=total, initial=step - 1, desc=f"{config.recipe} ({config.output.name})", unit="step"))
        bars[0].set_postfix(loss=f"{record['loss']:.4f}", s_per_step=f"{record['seconds']:.2f}", refresh=False)
        bars[0].update(1)

    try:
        files = train_from_config(config, progress=progress, log=lambda message: tqdm.write(message))
    except TrainingStopped as e:  # a diverged loss: the message says what to do, and the last checkpoint is kept
        raise SystemExit(f"error: {e}") from None
    finally:
        for bar in bars:
            bar.close()
    if is_main_process():  # under a launcher the main process, which shows the progress, says what it wrote
        print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    end_processes()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m custvid_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="learn a case's subject and motion on the shapes world, then generate with the "
                                     "base model and customized, side by side and measured")
    p.add_argument("--cases", default=str(DEFAULT_CASES), help="case file")
    p.add_argument("--case", default=DEMO_CASE, help="which case of the file to learn")
    p.add_argument("--method", default=DEMO_METHOD, help="which rung of the benchmark's LoRA ladder learns it")
    p.add_argument("--training-steps", type=int, default=300,
                   help="the ladder's base step count (each rung trains a multiple of it)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same noise for both clips)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--out", default="out/demo", help="output folder (its training/ folder is resumed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: the shapes world is too small to gain from more, and several threads slow "
                        "down badly on a busy machine (0: torch's default)")
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
    p.add_argument("--sampling-steps", type=int, default=30, help="sampling steps per clip")
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
    p.add_argument("--perf-pairs", type=int, default=5,
                   help="perf: interleaved pairs of plain and controlled samplings per ratio, after one warm-up round")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=bench_control)

    p = sub.add_parser("bench-training", help="training speed and memory ratios (full objective vs plain LoRA, "
                                              "gradient checkpointing vs none)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4, help="timed steps per training run (even)")
    p.add_argument("--pairs", type=int, default=7,
                   help="interleaved pairs of plain and other training runs per ratio, after one warm-up round")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=bench_training)

    p = sub.add_parser("metrics", help="the papers' metrics of generated videos (CLIP-T/I, DINO-I, R-CLIP/R-DINO, "
                                       "T.Cons, flicker, motion smoothness, dynamic degree, motion fidelity, flow errors)")
    p.add_argument("--videos", nargs="+", required=True, help="video files or folders of frame images")
    p.add_argument("--out", required=True, help="folder for results.json, results.csv and results.md")
    p.add_argument("--prompts", nargs="*", default=[], help="one prompt for every video, or one per video (CLIP-T)")
    p.add_argument("--references", nargs="*", default=[],
                   help="the subject's reference photos (CLIP-I, DINO-I; with transparency, the opaque part is the "
                        "subject for R-CLIP / R-DINO)")
    p.add_argument("--reference-masks", nargs="*", default=[], help="a mask image per reference photo (white = subject)")
    p.add_argument("--reference-clips", nargs="*", default=[], help="reference clips of the motion (motion fidelity, "
                                                                     "dynamic degree's deviation)")
    p.add_argument("--camera-path", default="", help="the commanded camera path, as the camera nodes take it "
                                                      "('1: 0.25, 0' ...): camera flow error")
    p.add_argument("--boxes", default="", help="the subject's commanded boxes, as Subject Boxes takes them "
                                               "('0: x1, y1, x2, y2' ...): box flow error, and the region of R-CLIP / R-DINO")
    p.add_argument("--clip", default="", help="a transformers CLIP folder (config.json, weights, tokenizer)")
    p.add_argument("--dino", default="", help="DINOv2 weights (a folder or a file, as Load DINOv2 reads)")
    p.add_argument("--raft", default="", help="torchvision RAFT weights (.pth or .safetensors, as Load RAFT reads)")
    p.add_argument("--batch-size", type=int, default=8, help="images (or frame pairs) per encoder call")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(run=metrics)

    p = sub.add_parser("estimate", help="the peak GPU memory of a LoRA training run on a Wan model, and its parts "
                                        "(the estimator's, validated on measured peaks: docs/results.md)")
    p.add_argument("--model", default="wan2.1-1.3b", choices=list(WAN_SIZES), help="which Wan")
    p.add_argument("--size", default="480x832", help="HEIGHTxWIDTH of the clips in pixels")
    p.add_argument("--frames", type=int, default=33, help="frames per clip (1 + 4k; 1: photos)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--recipe", default="subject", choices=list(RECIPES))
    p.add_argument("--rank", type=int, default=32, help="the LoRA's rank")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS), help="the base model's weights")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    p.add_argument("--recompute-every", type=int, default=1, help="with checkpointing, recompute every k-th block")
    p.add_argument("--offload-activations", action="store_true", help="what the backward pass needs waits in CPU memory")
    p.add_argument("--blocks-to-swap", type=int, default=0, help="blocks whose weights wait in CPU memory")
    p.add_argument("--encoders-loaded", action="store_true", help="the VAE and text encoder stay on the GPU")
    p.add_argument("--card", type=float, default=0, help="GiB of a card: also say whether the run fits it")
    p.add_argument("--json", action="store_true", help="the parts in bytes as JSON")
    p.add_argument("--fit-table", action="store_true",
                   help="print the README's table of the settings that fit 12 to 80 GB for each Wan at 480x832")
    p.set_defaults(run=estimate_memory)

    p = sub.add_parser("train", help="train a recipe (subject, motion, joint, dualreal) on a Wan model from a TOML config: "
                                     "ComfyUI-loadable LoRAs, checkpoints a rerun resumes")
    p.add_argument("config", help="the TOML config (see configs/train_subject.toml)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the config's")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and what would be trained")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as e:  # a usage problem: the message, not a traceback
        parser.exit(2, f"error: {e}\n")
