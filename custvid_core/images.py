"""Checks and conversions for image batches in ComfyUI's layout, used across the library.

Images are float tensors `[N, H, W, C]` in [0, 1] (C = 3, or 4 with alpha, which is dropped);
masks are `[N, H, W]` in [0, 1]. Library callers may also pass a list of `[H, W, C]` images.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import InputError

MAX_SIDE = 8192  # beyond this a single frame no longer fits any consumer GPU's memory budget


def as_image_list(images: torch.Tensor | Sequence[torch.Tensor], input_name: str = "images",
                  min_count: int = 1) -> list[torch.Tensor]:
    """Validate images and return them as a list of float `[H, W, 3]` tensors."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise InputError(input_name, f"got a tensor of shape {tuple(images.shape)}",
                             "an IMAGE batch [count, height, width, 3]")
        items = list(images)
    else:
        items = list(images)
    if len(items) < min_count:
        what = "no images were given" if not items else f"only {len(items)} given"
        raise InputError(input_name, what, f"at least {min_count} image{'s' if min_count > 1 else ''}")
    out = []
    for i, img in enumerate(items):
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[-1] not in (3, 4):
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise InputError(input_name, f"image {i} has shape {shape}",
                             "RGB images [height, width, 3] (an alpha channel is ignored)")
        h, w = img.shape[:2]
        if min(h, w) < 2 or max(h, w) > MAX_SIDE:
            raise InputError(input_name, f"image {i} is {w}x{h} pixels",
                             f"sides between 2 and {MAX_SIDE} pixels")
        out.append(img[..., :3].float().clamp(0, 1))
    return out


def as_mask_list(masks: torch.Tensor | Sequence[torch.Tensor] | None, images: list[torch.Tensor],
                 input_name: str = "masks") -> list[torch.Tensor] | None:
    """Validate masks against the images they belong to: one per image, same height and width."""
    if masks is None:
        return None
    if isinstance(masks, torch.Tensor):
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3:
            raise InputError(input_name, f"got a tensor of shape {tuple(masks.shape)}",
                             "a MASK batch [count, height, width]")
        masks = list(masks)
    masks = list(masks)
    if len(masks) != len(images):
        raise InputError(input_name, f"{len(masks)} masks were given for {len(images)} images",
                         "one mask per image, or no masks at all")
    out = []
    for i, (m, img) in enumerate(zip(masks, images)):
        if m.ndim != 2 or tuple(m.shape) != tuple(img.shape[:2]):
            raise InputError(input_name, f"mask {i} is {tuple(m.shape)} but its image is {tuple(img.shape[:2])}",
                             "masks with the same height and width as their images")
        out.append(m.float().clamp(0, 1))
    return out


def stack_same_size(images: list[torch.Tensor], input_name: str) -> torch.Tensor:
    """Stack frames that must share one size (the frames of a clip)."""
    sizes = {tuple(i.shape) for i in images}
    if len(sizes) != 1:
        raise InputError(input_name, f"frames have different sizes {sorted(sizes)}",
                         "frames of one clip, all the same size")
    return torch.stack(images)


def hue_rotations(frames: torch.Tensor, copies: int) -> list[torch.Tensor]:
    """Frames `[F, H, W, 3]` and `copies` more versions of them with every hue turned evenly round the colour
    circle (3 copies: by a quarter, a half, three quarters): the same motion in other colours, so that a
    motion LoRA learning from them has no colour to learn (appearance debiasing). The input is not changed."""
    from torchvision.transforms.functional import adjust_hue

    if copies < 0:
        raise InputError("hue_copies", f"{copies}", "0 (off) or more copies")
    channels_first = frames.permute(0, 3, 1, 2)
    turns = [k / (copies + 1) for k in range(1, copies + 1)]
    return [frames] + [adjust_hue(channels_first, turn - 1.0 if turn > 0.5 else turn).permute(0, 2, 3, 1).contiguous()
                       for turn in turns]


def fill_region(image: torch.Tensor, mask: torch.Tensor, iterations: int = 0, margin: int = 1) -> torch.Tensor:
    """`image` `[H, W, 3]` with the pixels under `mask` `[H, W]`, grown by `margin` pixels, replaced by the
    surrounding pixels diffused inwards (repeated 3x3 averaging of the known pixels): a plain background where
    a subject was. The margin keeps the subject's soft edge, which a mask leaves out, from tinting the fill.
    `iterations` 0 runs until the hole is filled. The input is not changed."""
    hole = torch.nn.functional.max_pool2d((mask > 0)[None, None].float(), 2 * margin + 1, 1, margin)
    known = 1.0 - hole
    if known.sum() == 0:
        raise InputError("masks", "a mask covers the whole photo", "masks that leave some background")
    x = image.permute(2, 0, 1)[None] * known
    filled = known.clone()
    steps = iterations or (max(image.shape[:2]) + 1)
    for _ in range(steps):
        total = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        weight = torch.nn.functional.avg_pool2d(filled, 3, 1, 1, count_include_pad=False)
        spread = total / weight.clamp_min(1e-6)
        # Known pixels stay; unknown ones take the average of their known (or already filled) neighbours.
        x = torch.where(known > 0, x, spread * (weight > 0))
        filled = torch.maximum(known, (weight > 0).float())
    return x[0].permute(1, 2, 0).contiguous()


def straight_slides(mask: torch.Tensor, frames: int, travel: tuple[float, float], count: int,
                    generator: torch.Generator) -> torch.Tensor:
    """`count` random straight paths for the subject under `mask` `[H, W]`, as pixel offsets `[count, frames, 2]`
    (x, y) from where the photo has it: a random direction, a length drawn from `travel` (fractions of the
    photo's width over the whole clip), placed so the subject's box stays inside the photo (shortened if it
    cannot)."""
    if frames < 2:
        raise InputError("frames", f"{frames}", "2 or more frames for a moving clip")
    if not 0 <= travel[0] <= travel[1]:
        raise InputError("travel", f"{travel}", "a range of path lengths, 0 <= shortest <= longest")
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(xs) == 0:
        raise InputError("masks", "a mask is empty", "masks that cover the subject")
    h, w = mask.shape
    # How far the box may move each way: [left, right], [up, down].
    room = torch.tensor([[-float(xs.min()), float(w - 1 - xs.max())], [-float(ys.min()), float(h - 1 - ys.max())]])
    t = torch.linspace(0, 1, frames)
    paths = []
    for _ in range(count):
        angle = float(torch.rand((), generator=generator)) * 2 * math.pi
        length = (travel[0] + float(torch.rand((), generator=generator)) * (travel[1] - travel[0])) * w
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        span = direction * length  # from the first frame's offset to the last one's
        lo = torch.minimum(span.new_zeros(2), span)
        hi = torch.maximum(span.new_zeros(2), span)
        fit = ((room[:, 1] - room[:, 0]) / (hi - lo).clamp_min(1e-6)).min().clamp(max=1.0)
        span, lo, hi = span * fit, lo * fit, hi * fit
        # The start lies where the whole path keeps the box inside; drawn at random within that range.
        first = room[:, 0] - lo + torch.rand(2, generator=generator) * ((room[:, 1] - hi) - (room[:, 0] - lo)).clamp_min(0)
        paths.append(first[None] + t[:, None] * span[None])
    return torch.stack(paths)


def slide_subject(image: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor,
                  background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip of the masked subject of `image` `[H, W, 3]` sliding by `offsets` `[F, 2]` pixels (x, y) over
    `background` (default: the photo with the subject's place filled, `fill_region`): frames `[F, H, W, 3]`
    and the subject's masks `[F, H, W]`. A photo shown as a moving clip, so that a video model learning a
    subject from photos does not also learn that it stands still."""
    from torchvision.transforms.v2 import functional as tvf

    if background is None:
        background = fill_region(image, mask)
    layers = torch.cat([image.permute(2, 0, 1), mask[None].float()])  # the subject and its mask move together
    behind = background.permute(2, 0, 1)
    frames, masks = [], []
    for dx, dy in offsets.tolist():
        moved = tvf.affine(layers, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0],
                           interpolation=tvf.InterpolationMode.BILINEAR)
        alpha = moved[3:]
        frames.append((moved[:3] * alpha + behind * (1 - alpha)).permute(1, 2, 0))
        masks.append((alpha[0] > 0.5).float())
    return torch.stack(frames).clamp(0, 1), torch.stack(masks)


def moving_photos(images: list[torch.Tensor], masks: list[torch.Tensor], clips_per_photo: int, frames: int,
                  travel: tuple[float, float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`clips_per_photo` moving clips of each photo's subject (`slide_subject` along `straight_slides`),
    deterministic by seed: frames `[N * clips_per_photo, F, H, W, 3]`, masks `[N * clips_per_photo, F, H, W]`,
    photo by photo."""
    if clips_per_photo < 1:
        raise InputError("moving_clips", f"{clips_per_photo}", "1 or more clips per photo")
    g = torch.Generator().manual_seed(seed)
    clips, clip_masks = [], []
    for image, mask in zip(images, masks):
        background = fill_region(image, mask)
        for offsets in straight_slides(mask, frames, travel, clips_per_photo, g):
            f, m = slide_subject(image, mask, offsets, background)
            clips.append(f)
            clip_masks.append(m)
    return torch.stack(clips), torch.stack(clip_masks)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[F, H, W] -> [F, 4] normalised xyxy of each mask (zeros where a mask is empty)."""
    f, h, w = masks.shape
    cols, rows = (masks > 0.5).any(1), (masks > 0.5).any(2)
    ar_w, ar_h = torch.arange(w), torch.arange(h)
    x1 = torch.where(cols, ar_w, w).amin(1)
    x2 = torch.where(cols, ar_w + 1, 0).amax(1)
    y1 = torch.where(rows, ar_h, h).amin(1)
    y2 = torch.where(rows, ar_h + 1, 0).amax(1)
    boxes = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], 1).float()
    boxes[~cols.any(1)] = 0.0
    return boxes
