"""The world's base model: a tiny Wan 2.1 (diffusers' WanTransformer3DModel) with its text encoder.

It is saved in ComfyUI's native Wan layout, so ComfyUI's own UNETLoader detects the file as
Wan 2.1 text-to-video (dim a multiple of 128 with 128-dim heads, 16 latent channels, 4096-d text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import describe
from ..backbones.wan import WanBackbone, diffusers_to_native_key
from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .scene import WorldSpec
from .text import WorldTextEncoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_FILE = WEIGHTS_DIR / "diffusion_models" / "custvid_shapes_world_wan21.safetensors"
TEXT_FILE = WEIGHTS_DIR / "text_encoders" / "custvid_shapes_world_text.safetensors"
# The same world fine-tuned with camera pans and a stronger background pattern: the model the camera by latent
# shift is measured on (a denoiser that never saw its background move paints a shifted one back still).
PANS_MODEL_FILE = WEIGHTS_DIR / "diffusion_models" / "custvid_shapes_world_pans_wan21.safetensors"


def text_file_for(model_path: str | Path) -> Path:
    """The text encoder that belongs to a world model file: `<name>_text.safetensors` for `<name>_wan21.safetensors`,
    beside it (a world-train folder) or in the sibling text_encoders/ folder (how the pack ships them)."""
    model_path = Path(model_path)
    name = model_path.name.replace("_wan21.safetensors", "_text.safetensors")
    beside = model_path.parent / name
    return beside if beside.exists() else model_path.parent.parent / "text_encoders" / name


# What ComfyUI's Wan 2.1 detection fixes: patch 1x2x2, 128-dim heads, 256-d time frequencies.
DEFAULT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=6,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


@dataclass
class World:
    """The base model, its text encoder and the clip geometry it was trained on."""

    backbone: WanBackbone
    text: WorldTextEncoder
    spec: WorldSpec = field(default_factory=WorldSpec)
    info: dict = field(default_factory=dict)  # how the weights were made (command, seed, steps)


INITS = ("diffusers", "adaln-zero")


def build_world(config: dict | None = None, spec: WorldSpec = WorldSpec(), seed: int = 0,
                init: str = "diffusers") -> World:
    """A world with random weights. `init="adaln-zero"` starts every block as the identity and the
    output at zero (DiT's adaLN-Zero), which trains faster from scratch than diffusers' default."""
    from diffusers import WanTransformer3DModel

    if init not in INITS:
        raise InputError("init", f"'{init}'", f"one of {INITS}")
    with torch.random.fork_rng(devices=[]):  # the weights from `seed` alone; the global generator left as it was
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**(config or DEFAULT_CONFIG))
    if init == "adaln-zero":
        with torch.no_grad():
            for module in (model.condition_embedder.time_proj, model.proj_out):
                module.weight.zero_()
                module.bias.zero_()
            for block in model.blocks:
                block.scale_shift_table.zero_()
    return World(describe(model), WorldTextEncoder(), spec)


def world_config(world: World) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in world.backbone.model.config.items()
            if k in DEFAULT_CONFIG}


def save_world(world: World, model_path: str | Path = MODEL_FILE, text_path: str | Path = TEXT_FILE) -> None:
    """Write the model in ComfyUI's native Wan keys and the text encoder beside it (atomically)."""
    meta = {"custvid.world.config": world_config(world), "custvid.world.spec": world.spec.__dict__,
            "custvid.world.info": world.info}
    sd = {diffusers_to_native_key(k): v for k, v in world.backbone.model.state_dict().items()}
    save_safetensors(model_path, sd, meta)
    save_safetensors(text_path, {"embedding.weight": world.text.embedding.weight},
                     {"custvid.world.vocabulary": list(world.text.vocabulary),
                      "custvid.world.context_length": world.text.length})


def load_world(model_path: str | Path = MODEL_FILE, text_path: str | Path = TEXT_FILE) -> World:
    from diffusers import WanTransformer3DModel

    native, meta = load_safetensors(model_path, "world_model")
    if "custvid.world.config" not in meta:
        raise InputError("world_model", f"'{Path(model_path).name}' is not a shapes-world model",
                         "a file written by `python -m custvid_core world-train`")
    config = json.loads(meta["custvid.world.config"])
    config["patch_size"] = tuple(config["patch_size"])
    spec = json.loads(meta["custvid.world.spec"])
    spec = WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    model = WanTransformer3DModel(**config)
    names = {diffusers_to_native_key(k): k for k in model.state_dict()}
    model.load_state_dict({names[k]: v for k, v in native.items()})
    return World(describe(model.eval()), load_text_encoder(text_path), spec,
                 json.loads(meta.get("custvid.world.info", "{}")))


def load_text_encoder(path: str | Path = TEXT_FILE, input_name: str = "world_text_encoder") -> WorldTextEncoder:
    tensors, meta = load_safetensors(path, input_name)
    if "custvid.world.vocabulary" not in meta:
        raise InputError(input_name, f"'{Path(path).name}' is not a shapes-world text encoder",
                         "custvid_shapes_world_text.safetensors")
    text = WorldTextEncoder(json.loads(meta["custvid.world.vocabulary"]),
                            length=int(meta["custvid.world.context_length"]))
    text.load_state_dict(tensors)
    return text.eval()
