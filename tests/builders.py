"""Tiny real architectures with random weights and synthetic clips (nothing is downloaded)."""

import torch

# 64-dim heads like every published DINOv2, so a config read off weight shapes matches.
TINY_DINO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=56, patch_size=14,
                 mlp_ratio=2)


def moving_square_clip(frames=4, size=(40, 56), step=(3, 1), side=10):
    """A white square moving `step` (x, y) pixels per frame over a striped background, with its masks."""
    h, w = size
    clip = torch.zeros(frames, h, w, 3)
    clip[..., 2] = (torch.arange(w) % 8 < 4).float() * 0.5
    masks = torch.zeros(frames, h, w)
    for f in range(frames):
        x, y = 5 + step[0] * f, 5 + step[1] * f
        clip[f, y:y + side, x:x + side] = 1.0
        masks[f, y:y + side, x:x + side] = 1.0
    return clip, masks


def tiny_diffusers_wan(layers=2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=16, out_channels=16, text_dim=64, freq_dim=32, ffn_dim=64,
                                 num_layers=layers).eval()
