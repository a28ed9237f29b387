"""CLIP image and text features for the appearance metrics (CLIP-T, CLIP-I, R-CLIP, T.Cons).

CLIP is read through transformers' `CLIPModel` from a local folder (the one `save_pretrained` writes, or a
Hugging Face snapshot such as `openai/clip-vit-large-patch14`: `config.json`, the weights and the tokenizer's
files); nothing is downloaded. Images are prepared as CLIP's own processor does (shorter side resized to the
model's input size, centre crop, CLIP's mean and std), on whole batches at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipEncoder:
    """A CLIP model with its tokenizer."""

    model: torch.nn.Module
    tokenizer: Callable
    name: str

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def load_clip(path: str | Path, input_name: str = "clip_name") -> ClipEncoder:
    """CLIP from a local folder holding `config.json`, the weights and the tokenizer's files."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    expected = "a folder with a transformers CLIP model (config.json, model.safetensors and the tokenizer's files)"
    if not (path / "config.json").is_file():
        raise InputError(input_name, f"'{path}' has no config.json", expected)
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers reports bad folders with these
        raise InputError(input_name, f"'{path.name}' could not be read as CLIP ({str(e)[:300]})", expected) from e
    return ClipEncoder(model.eval(), tokenizer, path.name)


def _features(out) -> torch.Tensor:
    # transformers 5 returns the projected features as the output's pooler_output; earlier versions a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, H, W, 3]` in [0, 1] -> `[N, 3, size, size]` as CLIP's processor prepares them: the shorter side
    resized to `size` (bicubic), the centre cropped, CLIP's normalisation."""
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (rh - size) // 2, (rw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_features(clip: ClipEncoder, images: torch.Tensor, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Unit-length CLIP image embeddings `[N, D]` of images `[N, H, W, 3]` (one size), `batch_size` per call;
    `progress(images done)` after each call."""
    param = next(clip.model.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        batch = prepare_images(images[start:start + batch_size].to(param.device), clip.image_size)
        out.append(F.normalize(_features(clip.model.get_image_features(pixel_values=batch.to(param.dtype))).float(),
                               dim=-1).cpu())
        if progress is not None:
            progress(min(start + batch_size, len(images)))
    return torch.cat(out)


@torch.no_grad()
def text_features(clip: ClipEncoder, prompts: list[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings `[P, D]` (prompts longer than CLIP's context are cut, as CLIP does)."""
    param = next(clip.model.parameters())
    tokens = clip.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                            max_length=clip.model.config.text_config.max_position_embeddings)
    tokens = {k: v.to(param.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return F.normalize(_features(clip.model.get_text_features(**tokens)).float(), dim=-1).cpu()
