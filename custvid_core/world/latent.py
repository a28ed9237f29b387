"""The world's fixed, exactly invertible pixel <-> latent map (its "VAE").

Pixels `[..., F, H, W, 3]` in [0, 1] become latents `[..., 16, F, H/2, W/2]` the way Wan's latents
are laid out: each 2x2 pixel block is unshuffled into 12 channels and 4 zero channels pad it to
Wan's 16. Values are mapped as `4 * pixel - 1` so the world's dim background sits near 0 and the
latent's spread is about 0.5, like a normalised VAE latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 2
_USED = 3 * SPATIAL_FACTOR ** 2


def encode(frames: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] or [B, F, H, W, 3] pixels -> [B, 16, F, H/2, W/2] latents."""
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise InputError("frames", f"got shape {tuple(frames.shape)}", "[frames, height, width, 3] pixels")
    b, f, h, w, _ = frames.shape
    if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
        raise InputError("frames", f"{w}x{h} pixels", f"width and height divisible by {SPATIAL_FACTOR}")
    x = frames.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w) * 4 - 1
    x = F.pixel_unshuffle(x, SPATIAL_FACTOR)
    x = torch.cat([x, x.new_zeros(b * f, LATENT_CHANNELS - _USED, *x.shape[-2:])], 1)
    return x.view(b, f, LATENT_CHANNELS, h // 2, w // 2).permute(0, 2, 1, 3, 4).contiguous()


def decode(latents: torch.Tensor) -> torch.Tensor:
    """[B, 16, F, h, w] latents -> [B, F, 2h, 2w, 3] pixels in [0, 1] (the padding channels are ignored)."""
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise InputError("latents", f"got shape {tuple(latents.shape)}", "[batch, 16, frames, height, width]")
    b, _, f, h, w = latents.shape
    x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, LATENT_CHANNELS, h, w)[:, :_USED]
    x = F.pixel_shuffle(x, SPATIAL_FACTOR)
    x = ((x + 1) / 4).clamp(0, 1)
    return x.view(b, f, 3, h * 2, w * 2).permute(0, 1, 3, 4, 2).contiguous()
