"""Subject representation: DINOv2 features of the reference images (SMRABooth's subject encoder).

SMRABooth aligns a projection of the video model's hidden states with the DINOv2 patch tokens
of the subject's reference image (SuRA). This module loads a DINOv2 encoder from local weights
and turns reference images (+ optional masks) into patch tokens on a known grid, the CLS
feature, and a mask-pooled object feature per image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..files import WEIGHT_SUFFIXES, load_safetensors, load_state_dict
from ..images import as_image_list, as_mask_list

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIT_MODES = ("pad", "stretch")
MAX_RESOLUTION = 2048

# transformers renamed DINOv2's attention weights in v5; files from either era must load into either.
_ATTENTION_NAMES = (("attention.attention.query.", "attention.q_proj."),
                    ("attention.attention.key.", "attention.k_proj."),
                    ("attention.attention.value.", "attention.v_proj."),
                    ("attention.output.dense.", "attention.o_proj."))


@dataclass
class DinoEncoder:
    """A DINOv2 model ready for feature extraction, with the facts extraction needs."""

    model: torch.nn.Module
    name: str

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)


@dataclass
class SubjectRepresentation:
    """DINOv2 features of a subject's reference images.

    patch_tokens: [N, gh, gw, D] final-layer patch tokens (after DINOv2's layer norm) on the grid
        of the image resized to `resolution` (gh = gw = resolution / patch_size).
    cls_token: [N, D] the CLS feature (DINO-I compares these).
    object_features: [N, D] patch tokens averaged with the mask as weights (the whole image
        without masks): an object-level feature that ignores the background.
    patch_masks: [N, gh, gw] fraction of each patch covered by the subject (all ones without masks).
    """

    patch_tokens: torch.Tensor
    cls_token: torch.Tensor
    object_features: torch.Tensor
    patch_masks: torch.Tensor
    encoder: str
    resolution: int
    patch_size: int
    fit: str
    has_masks: bool

    kind = "subject"

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_tokens.shape[1:3])


def _config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """Read a DINOv2 configuration off the weight shapes (all DINOv2 sizes use 64-dim heads)."""
    dim = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_pos = sd["embeddings.position_embeddings"].shape[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    swiglu = "encoder.layer.0.mlp.weights_in.weight" in sd
    if swiglu:
        hidden = sd["encoder.layer.0.mlp.weights_in.weight"].shape[0] // 2
        # transformers' SwiGLU rounds its width up: hidden = ((int(d*ratio*2/3) + 7) // 8) * 8
        mlp_ratio = next(r for r in (4, 2, 1) if ((int(dim * r * 2 / 3) + 7) // 8) * 8 == hidden)
    else:
        mlp_ratio = sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // dim
    return dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=max(1, dim // 64),
                patch_size=patch, image_size=int(round(math.sqrt(n_pos))) * patch,
                mlp_ratio=mlp_ratio, use_swiglu_ffn=swiglu)


def _rename_to(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and translate attention names to what the installed transformers uses."""
    for prefix in ("dinov2.", "model.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if k not in expected:
            for old, new in _ATTENTION_NAMES:
                for a, b in ((old, new), (new, old)):
                    if a in k and k.replace(a, b) in expected:
                        k = k.replace(a, b)
        out[k] = v
    return out


def build_dinov2(config: dict, name: str = "dinov2") -> DinoEncoder:
    """Build a DINOv2 (transformers' `Dinov2Model`) from a config dict, with random weights."""
    from transformers import Dinov2Config, Dinov2Model

    return DinoEncoder(Dinov2Model(Dinov2Config(**config)).eval(), name)


# Bounds well beyond every DINOv2 (giant: 1536 wide, 40 layers, 24 heads, patch 14, 518 px), so a damaged or
# foreign config is refused before a model of its sizes is built.
DINO_LIMITS = {"hidden_size": 8192, "num_hidden_layers": 128, "num_attention_heads": 128, "patch_size": 64,
               "image_size": 4096, "num_channels": 4, "mlp_ratio": 16}


def _read_config(text: str, where: str, input_name: str) -> dict:
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise InputError(input_name, f"{where} is not a JSON object of settings",
                         "the config.json that came with the DINOv2 weights")
    return config


def _check_sizes(config: dict, name: str, input_name: str) -> None:
    """The sizes a configuration gives (those it leaves to DINOv2's defaults are sane), within DINO_LIMITS."""
    for key, limit in DINO_LIMITS.items():
        value = config.get(key, 1)
        kind = (int, float) if key == "mlp_ratio" else int
        if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value <= limit:
            raise InputError(input_name, f"'{name}' has {key} = {value!r} in its configuration",
                             f"a DINOv2 configuration with {key} from 1 to {limit}")
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if width and heads and width % heads:
        raise InputError(input_name, f"'{name}' has {heads} attention heads for a width of {width}",
                         "a DINOv2 configuration whose heads divide its width")
    patch, image = config.get("patch_size"), config.get("image_size")
    if patch and image and patch > image:
        raise InputError(input_name, f"'{name}' has patches of {patch} pixels in {image}-pixel images",
                         "a DINOv2 configuration with patches smaller than its images")


def load_dinov2(path: str | Path, input_name: str = "dino_path") -> DinoEncoder:
    """Load DINOv2 from a Hugging Face folder (config.json + weights) or a single weights file.

    A single file gets its configuration from a `config.json` beside it, from its safetensors
    metadata (`config`), or from its weight shapes.
    """
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    expected = "a DINOv2 checkpoint (transformers' Dinov2Model: a folder with config.json, or a weights file)"
    if path.is_dir():
        weights = [p for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        if not weights:
            raise InputError(input_name, f"folder '{path}' holds no weights file", expected)
        path = next((p for p in weights if p.suffix == ".safetensors"), weights[0])
    if not path.is_file():
        raise InputError(input_name, f"'{path}' does not exist", expected)

    config = None
    if path.suffix == ".safetensors":
        sd, meta = load_safetensors(path, input_name)
        if "config" in meta:
            config = _read_config(meta["config"], f"'{path.name}''s config metadata", input_name)
    else:
        sd = load_state_dict(path, input_name)
    if (path.parent / "config.json").is_file():
        config = _read_config((path.parent / "config.json").read_text(errors="replace"),
                              f"'{path.parent.name}/config.json'", input_name)
    sd = _rename_to(sd, set())  # prefixes only, so the shape probe below finds its keys
    try:
        config = config or _config_from_state_dict(sd)
    except (KeyError, ValueError, StopIteration) as e:
        raise InputError(input_name, f"'{path.name}' does not look like DINOv2 weights (missing {e})",
                         expected) from e
    _check_sizes(config, path.name, input_name)
    try:
        cfg = Dinov2Config(**config)
    except Exception as e:  # transformers checks some settings itself, with several error types
        raise InputError(input_name, f"'{path.name}' has a configuration DINOv2 does not accept ({e})",
                         expected) from e
    if getattr(cfg, "model_type", "dinov2") != "dinov2":
        raise InputError(input_name, f"'{path.name}' is a {cfg.model_type} model", expected)
    _check_sizes(cfg.to_dict(), path.name, input_name)
    with torch.device("meta"):
        expected_keys = set(Dinov2Model(cfg).state_dict())
    sd = _rename_to(sd, expected_keys)
    model = Dinov2Model(cfg)
    missing, unexpected = set(expected_keys) - set(sd), set(sd) - set(expected_keys)
    if missing or unexpected:
        raise InputError(input_name, f"'{path.name}' does not match a DINOv2 model "
                         f"({len(missing)} weights missing, e.g. {sorted(missing)[:2]}; "
                         f"{len(unexpected)} unexpected, e.g. {sorted(unexpected)[:2]})", expected)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(input_name, f"'{path.name}' has weights of the wrong shape ({str(e)[:300]})",
                         expected) from e
    return DinoEncoder(model.eval(), path.stem if path.stem not in ("model", "pytorch_model") else path.parent.name)


def _fit_square(x: torch.Tensor, size: int, fit: str, mode: str) -> torch.Tensor:
    """[C, H, W] -> [C, size, size]; 'pad' keeps the aspect ratio by padding with zeros (black / no subject)."""
    if fit == "pad":
        c, h, w = x.shape
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    kwargs = {"antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


@torch.no_grad()
def extract_subject(encoder: DinoEncoder, images: torch.Tensor | Sequence[torch.Tensor],
                    masks: torch.Tensor | Sequence[torch.Tensor] | None = None, resolution: int = 448,
                    fit: str = "pad", batch_size: int = 4,
                    progress: Callable[[int, int], None] | None = None) -> SubjectRepresentation:
    """DINOv2 features of reference images of any size and count.

    Each image is fitted to a `resolution` square ('pad' letterboxes, 'stretch' resizes), so
    every image has the same token grid. `progress(done, total)` is called after each batch;
    without it a tqdm bar is shown.
    """
    imgs = as_image_list(images, "images")
    mask_list = as_mask_list(masks, imgs, "masks")
    p = encoder.patch_size
    if fit not in FIT_MODES:
        raise InputError("fit", f"'{fit}' is not a fit mode", f"one of {FIT_MODES}")
    if not (2 * p <= resolution <= MAX_RESOLUTION) or resolution % p:
        raise InputError("resolution", f"{resolution} is not usable with patch size {p}",
                         f"a multiple of {p} between {2 * p} and {MAX_RESOLUTION}")
    if batch_size < 1:
        raise InputError("batch_size", f"{batch_size} is below 1", "a batch size of 1 or more")
    if mask_list is not None:
        empty = [i for i, m in enumerate(mask_list) if m.max() <= 0]
        if empty:
            raise InputError("masks", f"mask {empty[0]} is empty", "masks that mark the subject in each image")

    model = encoder.model
    param = next(model.parameters())
    mean = torch.tensor(IMAGENET_MEAN, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=param.device).view(1, 3, 1, 1)
    grid = resolution // p
    pixels = torch.stack([_fit_square(i.permute(2, 0, 1), resolution, fit, "bilinear") for i in imgs])
    if mask_list is not None:
        fitted = torch.stack([_fit_square(m[None], resolution, fit, "bilinear") for m in mask_list])
        patch_masks = F.adaptive_avg_pool2d(fitted, grid)[:, 0]
    else:
        patch_masks = torch.ones(len(imgs), grid, grid)

    bar = None
    if progress is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(imgs), desc="DINOv2 subject features", unit="image")
    tokens, cls = [], []
    for start in range(0, len(imgs), batch_size):
        batch = pixels[start:start + batch_size].to(param.device)
        out = model(pixel_values=((batch - mean) / std).to(param.dtype))
        hidden = out.last_hidden_state.float()
        cls.append(hidden[:, 0].cpu())
        # Registers (DINOv2-reg) sit between CLS and the patches; the patches are always last.
        tokens.append(hidden[:, -grid * grid:].reshape(-1, grid, grid, hidden.shape[-1]).cpu())
        done = min(start + batch_size, len(imgs))
        if bar is not None:
            bar.update(done - bar.n)
        else:
            progress(done, len(imgs))
    if bar is not None:
        bar.close()
    patch_tokens = torch.cat(tokens)
    weights = patch_masks[..., None]
    object_features = (patch_tokens * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1e-6)
    return SubjectRepresentation(patch_tokens=patch_tokens, cls_token=torch.cat(cls),
                                 object_features=object_features, patch_masks=patch_masks,
                                 encoder=encoder.name, resolution=resolution, patch_size=p, fit=fit,
                                 has_masks=mask_list is not None)
