"""The metrics' cost on an 81-frame 480x832 clip, estimated from a CPU run of a few frames.

    python benchmarks/metrics_speed.py --out out/bench_metrics [--frames 5] [--rounds 3]

The encoders are the real architectures at their published sizes with random weights (the cost does not depend on the
weights): CLIP ViT-L/14 (224 px), DINOv2-base (224 px, as DINO-I runs it) and torchvision's RAFT large (frames at most
512 px on their longer side, 12 updates). Each encoder's time per image (per frame pair for RAFT) is measured on
`--frames` frames and scaled to what `measure_video` runs for the clip: CLIP and DINOv2 on 81 frames and 81 subject
crops, RAFT on 80 pairs. The GPU figure divides the measured floating-point operations (torch's FlopCounterMode) by an
assumed sustained rate (`--gpu-tflops`, default 20: a third of an H100's fp32 peak); it is an estimate, not a timing.
Also the ratio of batched to one-image-at-a-time encoder calls, interleaved (A B A B), as a median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

CLIP_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768)
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518,
                   mlp_ratio=4)
CLIP_FRAMES, PAIRS = 81, 80
SIZE = (480, 832)


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, default=5, help="frames measured on the CPU (>= 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of batched and single calls")
    parser.add_argument("--gpu-tflops", type=float, default=20.0, help="assumed sustained GPU rate for the estimate")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from builders import tiny_clip_folder
    from transformers import CLIPConfig, CLIPModel

    from custvid_core.eval.clip import ClipEncoder, image_features, load_clip
    from custvid_core.eval.measure import dino_resolution
    from custvid_core.representations.motion import build_raft, compute_flow
    from custvid_core.representations.subject import build_dinov2, extract_subject

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = load_clip(tiny_clip_folder(out / "tokenizer")).tokenizer  # text costs nothing next to the frames
    clip = ClipEncoder(CLIPModel(CLIPConfig(**CLIP_L14)).eval(), tokenizer, "clip-vit-large-patch14 (random)")
    dino = build_dinov2(DINOV2_BASE, "dinov2-base (random)")
    raft = build_raft("raft_large")
    frames = torch.rand(args.frames, *SIZE, 3, generator=torch.Generator().manual_seed(0))
    side = dino_resolution(dino)

    def quiet(*_):
        pass

    stages = {
        "clip": (lambda: image_features(clip, frames, batch_size=8), args.frames, 2 * CLIP_FRAMES),
        "dino": (lambda: extract_subject(dino, frames, resolution=side, batch_size=8, progress=quiet), args.frames,
                 2 * CLIP_FRAMES),
        "raft": (lambda: compute_flow(raft, frames, batch_size=4, progress=quiet), args.frames - 1, PAIRS),
    }
    report = {"frames_measured": args.frames, "size": SIZE, "threads": torch.get_num_threads(), "stages": {}}
    with torch.no_grad():
        for name, (run, measured, needed) in stages.items():
            run()  # warm-up
            seconds = _seconds(run)
            flops = _flops(run)
            report["stages"][name] = {"cpu_seconds_per_item": seconds / measured,
                                      "cpu_seconds_for_clip": seconds / measured * needed,
                                      "gflops_per_item": flops / measured / 1e9,
                                      "gpu_seconds_for_clip_estimate": flops / measured * needed / (args.gpu_tflops * 1e12)}
            print(name, json.dumps(report["stages"][name]))

        batched, single = [], []
        for _ in range(args.rounds):  # A B A B: batches of 8 against one image per call
            batched.append(_seconds(lambda: image_features(clip, frames, batch_size=8)))
            single.append(_seconds(lambda: image_features(clip, frames, batch_size=1)))
        report["clip_batched_over_single_median_ratio"] = statistics.median(b / s for b, s in zip(batched, single))
    report["cpu_seconds_for_clip"] = sum(s["cpu_seconds_for_clip"] for s in report["stages"].values())
    report["gpu_seconds_for_clip_estimate"] = sum(s["gpu_seconds_for_clip_estimate"] for s in report["stages"].values())
    (out / "metrics_speed.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "stages"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
