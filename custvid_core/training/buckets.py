"""Size and length buckets: photos and clips of mixed sizes, aspect ratios and lengths, trainable together.

Each item is fitted to a bucket: a size on the model's grid (Wan 2.1: VAE stride 8 x patch 2 = 16 pixels) whose
aspect ratio is nearest the item's among the sizes that fit a pixel budget (the user's width x height), and a
frame count the VAE encodes whole (Wan: 1 + 4k). As musubi-tuner's bucket selector does, every width on the grid
gets the tallest height on the grid that keeps width x height within the budget, and an item takes the size of the
nearest aspect ratio; it is scaled to cover that size and its centre is cropped. Clips are trimmed to the frame
count (their first frames kept), never padded with frames that were not filmed. Masks, RAFT flow and DINOv2
patch tokens are fitted with their items, so they keep marking the same pixels.

    rule = BucketRule(width=832, height=480)
    bucket = rule.bucket_for(width=1920, height=1080, frames=50)   # 848x464x49
    clip = fit_clip(frames, bucket)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..representations.motion import resize_flow

# The widest aspect ratio a bucket takes (4:1 either way): beyond it a budget's sizes are slivers a grid apart.
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Bucket:
    """A size in pixels and a frame count (1 for photos)."""

    width: int
    height: int
    frames: int = 1

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" + (f"x{self.frames}" if self.frames > 1 else "")


@dataclass(frozen=True)
class BucketRule:
    """How items are fitted to buckets.

    width, height: the pixel budget: every bucket holds at most width x height pixels.
    grid: bucket sides are multiples of this (the VAE's stride times the model's patch: 16 on Wan 2.1, 32 on
        Wan 2.2's TI2V-5B).
    frame_step: the VAE's frames per latent frame (Wan: 4); first_frame_alone: the VAE encodes the first frame on
        its own (Wan: clips of 1 + 4k frames); otherwise clips of k x frame_step frames."""

    width: int = 832
    height: int = 480
    grid: int = 16
    frame_step: int = 4
    first_frame_alone: bool = True

    def __post_init__(self):
        if self.grid < 1:
            raise InputError("grid", f"{self.grid}", "a grid of 1 or more pixels (16 on Wan 2.1)")
        if min(self.width, self.height) < self.grid:
            raise InputError("buckets", f"a budget of {self.width}x{self.height} pixels",
                             f"a width and height of at least {self.grid} pixels (e.g. 832x480)")
        if self.frame_step < 1:
            raise InputError("frame_step", f"{self.frame_step}", "1 or more frames per latent frame (Wan: 4)")

    def sizes(self) -> list[tuple[int, int]]:
        """Every bucket size (width, height) of the budget, widest first: each width's tallest height, and the
        largest square (which the widths' tallest heights can miss)."""
        area, g = self.width * self.height, self.grid
        side = math.isqrt(area) // g * g
        sizes = [(side, side)]
        for w in range(g, area // g + 1, g):
            h = area // w // g * g
            if h >= g and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
                sizes.append((w, h))
        return sorted(set(sizes), reverse=True)

    def bucket_for(self, width: int, height: int, frames: int = 1) -> Bucket:
        """The bucket of an item of `width` x `height` pixels and `frames` frames (1: a photo)."""
        aspect = math.log(width / height)
        # Nearest aspect ratio on a log scale (2:1 and 1:2 are as far from 1:1); ties go to the larger size.
        w, h = min(self.sizes(), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
        return Bucket(w, h, 1 if frames == 1 else self.frames_for(frames))

    def frames_for(self, frames: int) -> int:
        """The most frames, at most `frames`, that the VAE encodes whole."""
        step = self.frame_step
        kept = 1 + (frames - 1) // step * step if self.first_frame_alone else frames // step * step
        shortest = 1 + step if self.first_frame_alone else step
        if kept < shortest or frames < 2:
            raise InputError("frames", f"a clip of {frames} frames",
                             f"clips of at least {shortest} frames ({'1 + ' if self.first_frame_alone else ''}"
                             f"{step}k are used whole; longer clips are trimmed)")
        return kept


@dataclass(frozen=True)
class Crop:
    """Where an item of `size` (height, width) lands in its bucket: scaled to `scaled` (height, width), which
    covers the bucket, then cut at (`top`, `left`)."""

    size: tuple[int, int]
    scaled: tuple[int, int]
    top: int
    left: int
    bucket: Bucket

    def box(self) -> tuple[float, float, float, float]:
        """The kept region as fractions of the item: (top, left, bottom, right)."""
        sh, sw = self.scaled
        return (self.top / sh, self.left / sw, (self.top + self.bucket.height) / sh, (self.left + self.bucket.width) / sw)


def crop_for(height: int, width: int, bucket: Bucket) -> Crop:
    """Scale an item of `height` x `width` to cover `bucket` (keeping its aspect ratio), centred."""
    scale = max(bucket.width / width, bucket.height / height)
    sh, sw = max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale))
    return Crop((height, width), (sh, sw), (sh - bucket.height) // 2, (sw - bucket.width) // 2, bucket)


def _fit_planes(x: torch.Tensor, crop: Crop) -> torch.Tensor:
    """`[N, C, H, W]` resized to the crop's scaled size and cut to its bucket."""
    if tuple(x.shape[-2:]) != crop.scaled:
        x = F.interpolate(x.float(), size=crop.scaled, mode="bilinear", antialias=True, align_corners=False)
    b = crop.bucket
    return x[..., crop.top:crop.top + b.height, crop.left:crop.left + b.width]


def fit_image(image: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """A photo `[H, W, 3]` fitted to `bucket` -> `[height, width, 3]` in [0, 1]."""
    crop = crop_for(*image.shape[:2], bucket)
    return _fit_planes(image.permute(2, 0, 1)[None], crop)[0].permute(1, 2, 0).clamp(0, 1).contiguous()


def fit_mask(mask: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """A mask `[H, W]` fitted to `bucket` as its photo or clip is -> `[height, width]` in [0, 1]."""
    crop = crop_for(*mask.shape, bucket)
    return _fit_planes(mask[None, None], crop)[0, 0].clamp(0, 1).contiguous()


def fit_clip(frames: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """A clip `[F, H, W, 3]`: its first `bucket.frames` frames, fitted to `bucket` -> `[frames, height, width, 3]`."""
    if frames.shape[0] < bucket.frames:
        raise InputError("frames", f"a clip of {frames.shape[0]} frames", f"at least {bucket.frames} frames")
    crop = crop_for(*frames.shape[1:3], bucket)
    kept = frames[:bucket.frames, ..., :3].permute(0, 3, 1, 2)
    return _fit_planes(kept, crop).permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def fit_flow(flow: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """RAFT flow `[F-1, 2, H, W]` (pixels) of a clip fitted to `bucket` as the clip is: the pairs of its kept frames,
    resized with its vectors rescaled, and cut -> `[frames-1, 2, height, width]`."""
    crop = crop_for(*flow.shape[-2:], bucket)
    kept = resize_flow(flow[:bucket.frames - 1].float(), crop.scaled)
    b = bucket
    return kept[..., crop.top:crop.top + b.height, crop.left:crop.left + b.width].contiguous()


def token_grid(tokens: int, bucket: Bucket) -> tuple[int, int]:
    """A grid of about `tokens` cells in the bucket's aspect ratio (at least one cell a side)."""
    rows = max(1, round(math.sqrt(tokens * bucket.height / bucket.width)))
    return rows, max(1, round(tokens / rows))


def fit_patch_tokens(tokens: torch.Tensor, size: tuple[int, int], fit: str, bucket: Bucket) -> torch.Tensor:
    """DINOv2 patch tokens `[gh, gw, D]` of a photo of `size` (height, width), extracted with `fit` ('pad': the photo
    letterboxed in the square grid, 'stretch': stretched over it), resampled over the part of the photo its bucket
    keeps -> `[rows, cols, D]` on `token_grid(gh * gw, bucket)`, the same grid for every photo of the bucket."""
    gh, gw, _ = tokens.shape
    top, left, bottom, right = crop_for(*size, bucket).box()
    if fit == "pad":  # where the photo lies in the padded square, as fractions of the grid
        h, w = size
        side = max(h, w)
        y0, x0 = (side - h) // 2 / side, (side - w) // 2 / side
        top, bottom = y0 + top * h / side, y0 + bottom * h / side
        left, right = x0 + left * w / side, x0 + right * w / side
    rows, cols = token_grid(gh * gw, bucket)
    # Cell centres of the output grid inside the kept region, in grid_sample's [-1, 1] coordinates.
    ys = (top + (bottom - top) * (torch.arange(rows) + 0.5) / rows) * 2 - 1
    xs = (left + (right - left) * (torch.arange(cols) + 0.5) / cols) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]
    sampled = F.grid_sample(tokens.permute(2, 0, 1)[None].float(), grid, mode="bilinear", align_corners=False)
    return sampled[0].permute(1, 2, 0).contiguous()
