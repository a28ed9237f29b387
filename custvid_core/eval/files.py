"""The metrics over video files: `python -m custvid_core metrics --videos ... [--references ...] [--prompts ...]`.

Videos are files PyAV reads (mp4, webm, gif...) or folders of frame images (in name order). Reference photos are
image files; a photo with transparency gives its subject's mask (opaque = subject), as a cut-out PNG does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .measure import Encoders, Targets, measure_video
from .report import write_results

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image(path: str | Path, input_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image file -> (`[H, W, 3]` in [0, 1], its alpha as a mask `[H, W]` or None when fully opaque)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(input_name, f"'{path}' could not be read as an image ({e})",
                         f"image files ({', '.join(IMAGE_SUFFIXES)})") from None
    pixels = torch.from_numpy(rgba)
    alpha = pixels[..., 3]
    return pixels[..., :3], (alpha if bool((alpha < 1).any()) else None)


def read_clip(path: str | Path, input_name: str, max_frames: int | None = None) -> torch.Tensor:
    """A video file or a folder of frame images -> `[F, H, W, 3]` in [0, 1]."""
    from ..media import read_video

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not files:
            raise InputError(input_name, f"folder '{path}' holds no frame images", f"images ({', '.join(IMAGE_SUFFIXES)})")
        return torch.stack([read_image(p, input_name)[0] for p in files])
    if not path.is_file():
        raise InputError(input_name, f"'{path}' does not exist", "video files or folders of frame images")
    try:
        return read_video(path, max_frames)
    except Exception as e:  # PyAV raises its own error types for files it cannot decode
        raise InputError(input_name, f"'{path}' could not be decoded ({e})",
                         "video files PyAV reads (mp4, webm, gif...) or folders of frame images") from None


def measure_files(videos: list[str], out: str | Path, encoders: Encoders, targets: Targets,
                  prompts: list[str] | None = None, references: list[str] | None = None,
                  reference_masks: list[str] | None = None, reference_clips: list[str] | None = None,
                  command: str = "") -> list[dict]:
    """Measure every video against the same references (and its prompt: one for all, or one per video) and write
    results.json, results.csv and results.md to `out`. A bar counts the videos."""
    from tqdm.auto import tqdm

    prompts = prompts or [""]
    if len(prompts) not in (1, len(videos)):
        raise InputError("--prompts", f"{len(prompts)} prompts for {len(videos)} videos", "one prompt, or one per video")
    photos, masks = [], []
    for path in references or []:
        photo, alpha = read_image(path, "--references")
        photos.append(photo)
        masks.append(alpha)
    if reference_masks:
        if len(reference_masks) != len(photos):
            raise InputError("--reference-masks", f"{len(reference_masks)} masks for {len(photos)} references",
                             "one mask image per reference photo (white = subject)")
        masks = [read_image(p, "--reference-masks")[0].mean(-1) for p in reference_masks]
    if any(m is None for m in masks):
        masks = None  # masks for all photos or none: a photo without transparency has no region to crop
    clips = [read_clip(p, "--reference-clips") for p in reference_clips or []]
    targets = replace(targets, photos=photos or None, photo_masks=masks or None, clips=clips)
    rows = []
    for i, video in enumerate(tqdm(videos, desc="CustVid metrics", unit="video")):
        frames = read_clip(video, "--videos")
        prompt = prompts[i if len(prompts) > 1 else 0]
        scores = measure_video(frames, replace(targets, prompt=prompt), encoders, progress=lambda *_: None)
        rows.append({"video": Path(video).name, "path": str(video), "prompt": prompt, **scores})
    note = (f"Videos measured by `{command}`. " if command else "") + \
        "Higher is better except flicker, dynamic_degree_deviation and the flow errors; dynamic_degree is best near " \
        "the reference clips'."
    write_results(out, rows, note, {"command": command, "references": references or [],
                                    "reference_clips": reference_clips or [], "encoders": {
                                        k: getattr(getattr(encoders, k), "name", None) for k in ("clip", "dino", "raft")}})
    return rows
