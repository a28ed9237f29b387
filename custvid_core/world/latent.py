"""The world's fixed, exactly invertible pixel <-> latent map (its "VAE").

Like Wan's VAE it compresses time, but further: a whole 5-frame world clip becomes one latent frame
whose channels hold the 5 frames' RGB values (5 x 3 = 15 channels, padded with a zero channel to
Wan's 16). Space is not compressed, so a Wan token (2x2 latent positions) covers 2x2 pixels over
the whole clip: a token sees the motion through its place in its own channels, and the model draws
a clip the way an image model draws an image. (With several latent frames a model this small kept
each latent frame coherent but let the object jump between them.) Values are mapped as
`4 * pixel - 1`, so the world's dim background sits near 0 and the latent's spread is about 0.5,
like a normalised VAE latent.
"""

from __future__ import annotations

import torch

from ..errors import InputError

LATENT_CHANNELS = 16
SPATIAL_FACTOR = 1
TEMPORAL_FACTOR = 5
_USED = 3 * TEMPORAL_FACTOR


def encode(frames: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] or [B, F, H, W, 3] pixels -> [B, 16, F/5, H, W] latents."""
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise InputError("frames", f"got shape {tuple(frames.shape)}", "[frames, height, width, 3] pixels")
    b, f, h, w, _ = frames.shape
    if f % TEMPORAL_FACTOR:
        raise InputError("frames", f"{f} frames", f"a multiple of {TEMPORAL_FACTOR} frames")
    x = frames.float() * 4 - 1
    # [B, T, 4, H, W, 3] -> [B, T, 4*3, H, W]: channel = sub-frame * 3 + colour
    x = x.view(b, f // TEMPORAL_FACTOR, TEMPORAL_FACTOR, h, w, 3).permute(0, 1, 2, 5, 3, 4)
    x = x.reshape(b, f // TEMPORAL_FACTOR, _USED, h, w)
    x = torch.cat([x, x.new_zeros(b, f // TEMPORAL_FACTOR, LATENT_CHANNELS - _USED, h, w)], 2)
    return x.permute(0, 2, 1, 3, 4).contiguous()


def encode_stills(photos: torch.Tensor) -> torch.Tensor:
    """Photos `[N, H, W, 3]` -> `[N, 16, 1, H, W]`: each a still clip of one latent frame, as Wan's VAE
    encodes an image as a first frame on its own."""
    return encode(photos[:, None].expand(-1, TEMPORAL_FACTOR, -1, -1, -1))


def decode(latents: torch.Tensor) -> torch.Tensor:
    """[B, 16, T, H, W] latents -> [B, 5T, H, W, 3] pixels in [0, 1] (the padding channels are ignored)."""
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise InputError("latents", f"got shape {tuple(latents.shape)}", "[batch, 16, frames, height, width]")
    b, _, t, h, w = latents.shape
    x = latents[:, :_USED].permute(0, 2, 1, 3, 4).reshape(b, t, TEMPORAL_FACTOR, 3, h, w)
    x = ((x + 1) / 4).clamp(0, 1)
    return x.permute(0, 1, 2, 4, 5, 3).reshape(b, t * TEMPORAL_FACTOR, h, w, 3).contiguous()


def as_frames(latents: torch.Tensor) -> torch.Tensor:
    """`[B, 16, T, H, W]` latents -> `[B, 3, 5T, H, W]`: the same values with time on its own axis (what
    a camera shift moves frame by frame). Works on normalised latents too: the map only reorders."""
    b, _, t, h, w = latents.shape
    x = latents[:, :_USED].reshape(b, TEMPORAL_FACTOR, 3, t, h, w).permute(0, 2, 3, 1, 4, 5)
    return x.reshape(b, 3, t * TEMPORAL_FACTOR, h, w)


def from_frames(frames: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `as_frames`; the padding channels are taken from `latents`."""
    b, _, f, h, w = frames.shape
    t = f // TEMPORAL_FACTOR
    x = frames.reshape(b, 3, t, TEMPORAL_FACTOR, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b, _USED, t, h, w)
    return torch.cat([x, latents[:, _USED:]], 1)


class FramesInChannels:
    """How the world's latent holds time, for controls that move frames (a camera shift): each latent frame
    holds 5 frames in its channels. The world's text encoder hands it to ComfyUI's samplers in its conditioning,
    so a control learns the layout from the graph, not from a user's choice."""

    @staticmethod
    def frames(latent_frames: int) -> int:
        return latent_frames * TEMPORAL_FACTOR

    as_frames = staticmethod(as_frames)
    from_frames = staticmethod(from_frames)
