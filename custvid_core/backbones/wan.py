"""Descriptions of Wan 2.x video transformers, so the rest of CustVid never hard-codes module names.

Two implementations of the same architecture exist: ComfyUI's native
`comfy.ldm.wan.model.WanModel` (what `UNETLoader` gives) and diffusers' `WanTransformer3DModel`.
They differ only in module names. A description gives, for either: the blocks, the linear
layer of each role in a block, the token grid of a latent, one forward call, capture of a
block's hidden states, the attach points where adapters add to the model (a residual beside a block's
self-attention or FFN, an edit of the text context), and each role's name in ComfyUI's native LoRA key
form (`diffusion_model.blocks.N.self_attn.q`), which is the same for both.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import InputError
from .memory import MemorySettings, training_memory

# Roles of the linear layers in a Wan block, named as in ComfyUI's native checkpoints.
SELF_ATTENTION_ROLES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
CROSS_ATTENTION_ROLES = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
FFN_ROLES = ("ffn.0", "ffn.2")
ROLES = SELF_ATTENTION_ROLES + CROSS_ATTENTION_ROLES + FFN_ROLES
# The sublayers of a block that a residual can sit beside (`WanBackbone.add_residual`).
RESIDUAL_SITES = ("self_attn", "ffn")
NATIVE_PREFIX = "diffusion_model."
DIFFUSERS_TEXT_TOKENS = 512

# diffusers module path -> native module path, for everything a Wan 2.1 T2V checkpoint holds.
_DIFFUSERS_TO_NATIVE = (
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    # Image-to-video (Wan 2.1 I2V): the CLIP image embedding and each block's image keys and values.
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^blocks\.(\d+)\.attn2\.add_([kv])_proj\.", r"blocks.\1.cross_attn.\2_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
)


def diffusers_to_native_key(key: str) -> str:
    """A diffusers Wan weight name in ComfyUI's native form (without the `diffusion_model.` prefix)."""
    for pattern, repl in _DIFFUSERS_TO_NATIVE:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


@dataclass
class EmbeddedInputs:
    """What a forward feeds its first block: the video tokens after the patch embedding `[B, Lv, dim]`, the text
    tokens after the text embedding `[B, Lt, dim]`, and the timestep embedding `[B, dim]` (averaged over the
    tokens where each token has its own timestep, as on Wan 2.2's 5B)."""

    video: torch.Tensor
    text: torch.Tensor
    time: torch.Tensor


@dataclass
class ImageCondition:
    """What an image-to-video Wan takes beside the noisy latents: `latents` `[B, 4 + C, T, h, w]`, the start-frame
    mask (4 channels, 1 on the latent frames the start image fixes) followed by the VAE latents of the start image
    followed by grey frames (in the model's latent format), concatenated to the noisy latents' channels; and, for
    models with a CLIP image embedding (Wan 2.1 I2V), `clip_features` `[B, 257, 1280]`, CLIP vision's
    penultimate hidden states of the start image. ComfyUI's WanImageToVideo builds the same."""

    latents: torch.Tensor
    clip_features: torch.Tensor | None = None

    @classmethod
    def start_frame(cls, start: torch.Tensor, clip_features: torch.Tensor | None = None) -> "ImageCondition":
        """The condition of one start image: `start` `[B, C, T, h, w]`, the latents of the start image followed by
        grey frames, encoded as one clip (WanImageToVideo's encoding); the image fixes the first latent frame."""
        mask = torch.zeros(start.shape[0], 4, *start.shape[2:], dtype=start.dtype, device=start.device)
        mask[:, :, 0] = 1.0
        return cls(torch.cat([mask, start], 1), clip_features)


class WanBackbone:
    """A Wan transformer seen through roles. Subclasses say where each role's module lives."""

    implementation = ""
    role_paths: dict[str, str] = {}
    site_paths: dict[str, str] = {}  # residual site -> the sublayer's module path in a block
    text_embedding_path = ""  # the module the text context enters the model through
    patch_embedding_path = "patch_embedding"  # the video latents' patch embedding (a Conv3d)
    time_embedding_path = ""  # the timestep embedding (sinusoid -> MLP), before its projection to the blocks
    # Whether the layers cast their weights to the input's dtype (ComfyUI's ops), so that the model computes in
    # any dtype from weights stored in another (fp8 included). Plain torch layers compute in their weights' dtype.
    casts_weights = False

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        return self.role_module(0, "self_attn.q").in_features

    @property
    def text_dim(self) -> int:
        raise NotImplementedError

    @property
    def condition_channels(self) -> int:
        """Channels an image-to-video model takes beside the noisy latents (Wan 2.1 and 2.2 I2V: 20, the start-frame
        mask and the start image's latents); 0 for text-to-video."""
        return self.model.get_submodule(self.patch_embedding_path).weight.shape[1] - self.latent_channels

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def takes_clip_features(self) -> bool:
        """Whether the model has a CLIP image embedding (Wan 2.1 I2V; Wan 2.2's I2V has none)."""
        raise NotImplementedError

    def module_path(self, block: int, role: str) -> str:
        """The role's module path inside this implementation (for `get_submodule`, peft targets)."""
        if role not in self.role_paths:
            raise InputError("role", f"'{role}' is not a Wan block role", f"one of {ROLES}")
        if not 0 <= block < self.num_blocks:
            raise InputError("block", f"block {block} does not exist", f"0 to {self.num_blocks - 1}")
        return f"blocks.{block}.{self.role_paths[role]}"

    def role_module(self, block: int, role: str) -> nn.Linear:
        return self.model.get_submodule(self.module_path(block, role))

    def native_name(self, block: int, role: str) -> str:
        """The name ComfyUI's LoRA loader expects, the same for every implementation."""
        self.module_path(block, role)  # validates
        return f"{NATIVE_PREFIX}blocks.{block}.{role}"

    def role_modules(self, roles: Iterable[str] = ROLES, blocks: Iterable[int] | None = None
                     ) -> Iterator[tuple[str, nn.Linear]]:
        """(native name, module) for each role in each chosen block."""
        for b in range(self.num_blocks) if blocks is None else blocks:
            for role in roles:
                yield self.native_name(b, role), self.role_module(b, role)

    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """Tokens per axis (t, h, w) of a latent `[B, C, T, H, W]`; tokens are ordered t, then h, then w."""
        t, h, w = latent_shape[-3:]
        pt, ph, pw = self.patch_size
        return (math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw))

    # --- running ---------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor | float, context: torch.Tensor,
                image: ImageCondition | None = None) -> torch.Tensor:
        """Velocity prediction `v = eps - x0` for latents `[B, C, T, H, W]` at flow-matching time sigma; `image`: an
        image-to-video model's start-image condition (required by such a model, refused by others)."""
        raise NotImplementedError

    def require_text_to_video(self, what: str) -> None:
        """Refuses an image-to-video model for `what`, which trains text-to-video models only."""
        if self.condition_channels:
            raise InputError("model", f"an image-to-video Wan ({self.condition_channels} condition channels)",
                             f"a text-to-video Wan: {what} trains text-to-video models only")

    def _image_inputs(self, latents: torch.Tensor, image: ImageCondition | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's input latents (the noisy latents, then the condition's channels) and its CLIP features
        (None where the model takes none), the condition checked against what the model takes."""
        extra = self.condition_channels
        if image is None:
            if extra:
                raise InputError("start_image", f"this is an image-to-video Wan ({extra} condition channels) and no "
                                 "start image was given", "training data encoded with start images (the clips' first "
                                 "frames, the subject's photos), or a text-to-video model")
            return latents, None
        if not extra:
            raise InputError("start_image", "a start image was given to a text-to-video Wan",
                             "an image-to-video Wan model (Wan 2.1 or 2.2 I2V), or no start image")
        cond = image.latents
        if cond.shape[1] != extra or cond.shape[0] != latents.shape[0] or cond.shape[2:] != latents.shape[2:]:
            raise InputError("start_image", f"a condition of shape {tuple(cond.shape)} for latents of shape "
                             f"{tuple(latents.shape)}", f"{extra} channels on the latents' frames and size")
        features = None
        if self.takes_clip_features:
            if image.clip_features is None:
                raise InputError("clip_vision_output", "this Wan 2.1 image-to-video model takes the start image's CLIP "
                                 "vision features and none were given", "CLIP Vision Encode of the start image")
            features = image.clip_features.to(latents.dtype)
        return torch.cat([latents, cond.to(latents.dtype)], 1), features

    def _timestep(self, sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
        return (sigma.expand(batch) if sigma.ndim == 0 else sigma) * 1000.0  # Wan's t = 1000 * sigma

    @contextlib.contextmanager
    def capture(self, blocks: int | Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Record the hidden states `[B, L, dim]` leaving the chosen blocks during forwards in the block.

        Gradients flow through the captured tensors (SuRA trains a projector on them).
        """
        blocks = [blocks] if isinstance(blocks, int) else list(blocks)
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise InputError("block", f"block {b} does not exist", f"0 to {self.num_blocks - 1}")

            def hook(_module, _args, output, b=b):
                captured[b] = output[0] if isinstance(output, tuple) else output

            handles.append(self.blocks[b].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()


    def cross_attention(self, block: int) -> tuple[nn.Module, nn.Module, int]:
        """(query norm, key norm, heads) of a block's text cross-attention: the normalised q and k leave
        these norms, so hooks on them see exactly what the attention scores are made of."""
        raise NotImplementedError

    @contextlib.contextmanager
    def capture_cross_attention(self, blocks: Iterable[int]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Record each chosen block's cross-attention q `[B, Lq, dim]`, k `[B, Lk, dim]` and head count
        during forwards in the block (with gradients), to build attention maps from."""
        captured: dict[int, dict[str, torch.Tensor]] = {}
        handles = []
        try:
            for b in blocks:
                norm_q, norm_k, heads = self.cross_attention(b)
                captured[b] = {"heads": heads}

                def save(name, b=b):
                    def hook(_module, _args, output):
                        captured[b][name] = output
                    return hook

                handles += [norm_q.register_forward_hook(save("q")), norm_k.register_forward_hook(save("k"))]
            yield captured
        finally:
            for h in handles:
                h.remove()

    # --- attach points ---------------------------------------------------------------------
    def add_residual(self, block: int, site: str, residual: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        """Add `residual(h)` to the output of block `block`'s `site` sublayer (one of RESIDUAL_SITES), where `h`
        is the normalised, modulated tokens `[B, L, dim]` that feed that sublayer; the block's gate then scales
        the sum, as it scales the sublayer's own output. Gradients flow through `h` and `residual`.
        `.remove()` on the returned handle leaves the model as it was."""
        if site not in self.site_paths:
            raise InputError("site", f"'{site}' is not a place for a residual", f"one of {RESIDUAL_SITES}")
        if not 0 <= block < self.num_blocks:
            raise InputError("block", f"block {block} does not exist", f"0 to {self.num_blocks - 1}")

        def hook(_module, args, kwargs, output):
            h = args[0] if args else next(iter(kwargs.values()))
            return output + residual(h).to(output.dtype)

        return self.blocks[block].get_submodule(self.site_paths[site]).register_forward_hook(hook, with_kwargs=True)

    def edit_text_context(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        """Replace the text context `[B, L, text_dim]` by `edit(context)` where it enters the model (before the
        text embedding), in every forward until the returned handle's `.remove()`."""

        def hook(_module, args):
            return (edit(args[0]), *args[1:])

        return self.model.get_submodule(self.text_embedding_path).register_forward_pre_hook(hook)

    @contextlib.contextmanager
    def before_blocks(self, callback: Callable[[EmbeddedInputs], None]) -> Iterator[None]:
        """While inside, every forward calls `callback(inputs)` with its `EmbeddedInputs` after the embeddings and
        before the first block runs (what a controller that sets the blocks' adapters from the step's tokens and
        timestep needs). Gradients flow through the inputs."""
        seen: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(_module, _args, output):
                seen[name] = output
            return hook

        def call(_module, _args):
            video = seen["video"].flatten(2).transpose(1, 2)  # [B, dim, t, h, w] -> tokens in t, h, w order
            time = seen["time"]
            callback(EmbeddedInputs(video, seen["text"], time.reshape(video.shape[0], -1, time.shape[-1]).mean(1)))

        handles = [self.model.get_submodule(path).register_forward_hook(keep(name)) for name, path in
                   (("video", self.patch_embedding_path), ("text", self.text_embedding_path),
                    ("time", self.time_embedding_path))]
        handles.append(self.blocks[0].register_forward_pre_hook(call))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def training_memory(self, checkpointing: bool, memory: MemorySettings = MemorySettings(),
                        device: torch.device | None = None) -> contextlib.AbstractContextManager:
        """While inside, the blocks run with gradient checkpointing (`checkpointing`) and `memory`'s further savings
        (`memory.MemorySettings`: every k-th block, activations offloaded, blocks swapped to and from `device`,
        by default the first role layer's). The blocks' forwards are wrapped on the instance and restored on exit,
        so the same code serves ComfyUI's model (shared with the graph) and diffusers'. Capture hooks still fire
        once."""
        device = device or self.role_module(0, "self_attn.q").weight.device
        return training_memory(self.blocks, checkpointing, memory, torch.device(device))


class ComfyWanBackbone(WanBackbone):
    """ComfyUI's native `comfy.ldm.wan.model.WanModel` (module paths are the native names)."""

    implementation = "comfyui"
    role_paths = {r: r for r in ROLES}
    site_paths = {"self_attn": "self_attn", "ffn": "ffn"}
    text_embedding_path = "text_embedding"
    time_embedding_path = "time_embedding"
    casts_weights = True  # ComfyUI's cast ops; the host turns casting on for layers loaded without it

    @property
    def patch_size(self):
        return tuple(self.model.patch_size)

    @property
    def text_dim(self):
        return self.model.text_embedding[0].in_features

    @property
    def latent_channels(self):
        return self.model.out_dim

    @property
    def takes_clip_features(self):
        return getattr(self.model, "img_emb", None) is not None

    def cross_attention(self, block):
        attn = self.blocks[block].cross_attn
        return attn.norm_q, attn.norm_k, attn.num_heads

    def forward(self, latents, sigma, context, image=None):
        t = self._timestep(sigma, latents.shape[0], latents)
        x, features = self._image_inputs(latents, image)
        # A fresh transformer_options: ComfyUI's forward writes into it.
        return self.model(x, t, context, clip_fea=features, transformer_options={})


class DiffusersWanBackbone(WanBackbone):
    """diffusers' `WanTransformer3DModel`."""

    implementation = "diffusers"
    role_paths = {
        "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
        "self_attn.o": "attn1.to_out.0",
        "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
        "cross_attn.o": "attn2.to_out.0",
        "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    }
    site_paths = {"self_attn": "attn1", "ffn": "ffn"}
    text_embedding_path = "condition_embedder.text_embedder"
    time_embedding_path = "condition_embedder.time_embedder"

    @property
    def patch_size(self):
        return tuple(self.model.config.patch_size)

    @property
    def text_dim(self):
        return self.model.config.text_dim

    @property
    def latent_channels(self):
        return self.model.config.out_channels

    @property
    def takes_clip_features(self):
        return self.model.condition_embedder.image_embedder is not None

    def cross_attention(self, block):
        attn = self.blocks[block].attn2
        return attn.norm_q, attn.norm_k, attn.heads

    def forward(self, latents, sigma, context, image=None):
        t = self._timestep(sigma, latents.shape[0], latents)
        x, features = self._image_inputs(latents, image)
        if features is not None and context.shape[1] != DIFFUSERS_TEXT_TOKENS:
            # diffusers' attention finds the image tokens as those before the last 512 (umt5's padded length).
            raise InputError("conditioning", f"{context.shape[1]} text tokens", f"{DIFFUSERS_TEXT_TOKENS} (umt5's "
                             "padded length), which diffusers' image-to-video Wan needs beside CLIP features")
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=context,
                          encoder_hidden_states_image=features, return_dict=False)[0]

    @contextlib.contextmanager
    def text_cross_attention(self, hook: Callable[[int, Callable, torch.Tensor, torch.Tensor], torch.Tensor | None]
                             ) -> Iterator[None]:
        """While inside, block i's text cross-attention calls `hook(i, attend, hidden_states, context)`:
        `attend(hidden_states, context, bias)` runs the block's own attention with an optional logit bias
        `[B, Lq, Lk]` (the same for every head); the hook returns the attention's output, or None to leave
        the call as it is."""
        swapped = []
        try:
            for i, block in enumerate(self.blocks):
                attn = block.attn2
                original = attn.processor

                def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                              rotary_emb=None, _original=original, _i=i):
                    def attend(h, context, bias):
                        mask = None if bias is None else bias[:, None].to(h.dtype)  # one bias for every head
                        return _original(attn, h, context, mask, rotary_emb)

                    out = hook(_i, attend, hidden_states, encoder_hidden_states)
                    if out is None:
                        return _original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
                    return out

                attn.processor = processor
                swapped.append((attn, original))
            yield
        finally:
            for attn, original in swapped:
                attn.processor = original


def describe(model: nn.Module) -> WanBackbone:
    """The description matching a Wan model object, told apart by module layout (no host imports)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        first = blocks[0]
        if hasattr(first, "self_attn") and hasattr(first, "cross_attn"):
            return ComfyWanBackbone(model)
        if hasattr(first, "attn1") and hasattr(first, "attn2"):
            return DiffusersWanBackbone(model)
    raise InputError("model", f"a {type(model).__name__} is not a Wan video transformer",
                     "a Wan 2.1/2.2 model (ComfyUI's WanModel from UNETLoader, or diffusers' WanTransformer3DModel)")
