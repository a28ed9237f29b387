"""Checks and conversions for image batches in ComfyUI's layout, used across the library.

Images are float tensors `[N, H, W, C]` in [0, 1] (C = 3, or 4 with alpha, which is dropped);
masks are `[N, H, W]` in [0, 1]. Library callers may also pass a list of `[H, W, C]` images.
"""

from __future__ import annotations

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
