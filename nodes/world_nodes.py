"""Nodes for the shapes world: the small embedded model a new user runs first.

ComfyUI's own UNETLoader loads the world's Wan 2.1 file (CustVid adds its folder to
`diffusion_models`); Load Shapes World gives what a real Wan gets from its text encoder and VAE
loaders: the world's text encoder as a CLIP (for ComfyUI's CLIPTextEncode and every node that
takes a clip) and its fixed pixel <-> latent map as a VAE (for VAEEncode/VAEDecode).
"""

from __future__ import annotations

import functools

import comfy.latent_formats
import comfy.model_management
import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from ..custvid_core.errors import InputError
from ..custvid_core.training.datasets import VideoSet, converted
from ..custvid_core.world import latent as world_latent
from ..custvid_core.world.cases import load_cases
from ..custvid_core.world.customize import MOTION_WORD, vocabulary_clips
from ..custvid_core.world.model import load_text_encoder
from ..custvid_core.world.scene import WorldSpec
from ..custvid_core.world.text import WorldTextEncoder
from . import types
from .host import LATENT_LAYOUT, model_files

CATEGORY = "CustVid/shapes world"


class WorldVAE:
    """The world's exact pixel <-> latent map behind ComfyUI's VAE interface.

    ComfyUI normalises Wan latents with Wan 2.1's per-channel mean and std before the model
    sees them (`process_in`); this VAE emits latents that normalise to the world's own, so the
    model receives exactly what it was trained on.
    """

    latent_channels = world_latent.LATENT_CHANNELS
    latent_dim = 3
    downscale_ratio = world_latent.SPATIAL_FACTOR
    upscale_ratio = world_latent.SPATIAL_FACTOR

    def __init__(self):
        self.format = comfy.latent_formats.Wan21()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE frames `[F, H, W, 3]` (one clip, F a multiple of 4; or one photo, encoded as a still clip)
        -> LATENT `[1, 16, F/4, H, W]`."""
        pixels = pixels[..., :3].float().cpu()
        latents = world_latent.encode_stills(pixels) if pixels.shape[0] == 1 else world_latent.encode(pixels)
        return self.format.process_out(latents)

    def decode(self, samples: torch.Tensor, vae_options=None) -> torch.Tensor:
        return world_latent.decode(self.format.process_in(samples.float().cpu()))

    def decode_with_grad(self, samples: torch.Tensor) -> torch.Tensor:
        """`decode` keeping the autograd graph (MoRA's decoded-flow alignment)."""
        return world_latent.decode(self.format.process_in(samples.float()))

    @staticmethod
    def pixel_frames(t0: int, t1: int) -> tuple[int, int]:
        """Latent frames [t0, t1) hold exactly these clip frames."""
        return world_latent.TEMPORAL_FACTOR * t0, world_latent.TEMPORAL_FACTOR * t1

    def spacial_compression_encode(self):
        return world_latent.SPATIAL_FACTOR

    def spacial_compression_decode(self):
        return world_latent.SPATIAL_FACTOR

    def temporal_compression_decode(self):
        return world_latent.TEMPORAL_FACTOR


class _WorldTokenizer:
    """ComfyUI's tokenizer interface over the world's words: one token per word, padded with `<pad>` to the
    context length as umt5 pads, so code that finds words through `clip.tokenize` finds the world's too."""

    def __init__(self, text: WorldTextEncoder, embedding_directory=None, tokenizer_data=None):
        self.text = text
        self.pad_token = text.index["<pad>"]
        # ComfyUI's tokenizers name their inner tokenizer in `clip`; this one is its own.
        self.clip = "world"
        self.world = self

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        ids = self.text.tokenize(text)
        words = [(t, 1.0, i + 1) if return_word_ids else (t, 1.0) for i, t in enumerate(ids)]
        padding = [(self.pad_token, 1.0, 0) if return_word_ids else (self.pad_token, 1.0)] * (self.text.length - len(ids))
        return {"world": [words + padding]}

    def state_dict(self) -> dict:
        return {}


class _WorldTextModel(torch.nn.Module):
    """The `cond_stage_model` of the world's CLIP: tokens -> the world's context. Its conditioning also says how
    the world's latent holds time (`LATENT_LAYOUT`), which the camera sampler reads."""

    def __init__(self, text: WorldTextEncoder, device=None, dtype=None, model_options=None):
        super().__init__()
        self.text = text.to(device) if device is not None else text
        self.dtypes = {torch.float32}  # the embedding is used as trained, whatever dtype ComfyUI offers

    def reset_clip_options(self) -> None:
        pass

    def set_clip_options(self, options: dict) -> None:
        pass  # no layers to skip, no projection: the options of CLIP models do not apply

    def encode_token_weights(self, tokens: dict):
        pad = self.text.index["<pad>"]
        rows = [[t[0] for t in chunk if t[0] != pad] for chunk in tokens["world"]]
        with torch.no_grad():
            context = self.text.context(rows)
        # Where ComfyUI's own text encoders leave their output, whatever device encoded it.
        context = context.to(comfy.model_management.intermediate_device())
        return context, None, {LATENT_LAYOUT: world_latent.FramesInChannels()}


def world_clip(text: WorldTextEncoder) -> comfy.sd.CLIP:
    """The world's text encoder as ComfyUI's CLIP (clone, hooks and memory management as for any text encoder)."""
    target = type("WorldClipTarget", (), {})()
    target.params = {}
    target.clip = functools.partial(_WorldTextModel, text)
    target.tokenizer = functools.partial(_WorldTokenizer, text)
    parameters = sum(p.numel() for p in text.parameters())
    return comfy.sd.CLIP(target, parameters=parameters, model_options={"dtype": torch.float32})


def world_text_encoder(clip, input_name: str = "clip") -> WorldTextEncoder:
    """The world's text encoder inside a CLIP from Load Shapes World."""
    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, _WorldTextModel):
        raise InputError(input_name, "is not the shapes world's text encoder", "the clip from Load Shapes World")
    return model.text


def _text_encoder_input():
    return io.Combo.Input("text_encoder_name", options=model_files("custvid_world_text"),
                          tooltip="The world's text encoder, shipped with CustVid.")


def _load(text_encoder_name: str):
    path = folder_paths.get_full_path_or_raise("custvid_world_text", text_encoder_name)
    return world_clip(load_text_encoder(path, input_name="text_encoder_name")), WorldVAE()


class LoadShapesWorldClip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadShapesWorldClip",
            display_name="Load Shapes World (CLIP + VAE)",
            category=CATEGORY,
            description="The shapes world's text encoder (a CLIP for CLIP Text Encode) and its pixel<->latent map "
                        "(a VAE). Load its diffusion model with ComfyUI's Load Diffusion Model "
                        "(custvid_shapes_world_wan21.safetensors).",
            inputs=[_text_encoder_input()],
            outputs=[io.Clip.Output(display_name="clip"), io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, text_encoder_name) -> io.NodeOutput:
        return io.NodeOutput(*_load(text_encoder_name))


class LoadShapesWorld(io.ComfyNode):
    """Kept for saved workflows: its text encoder output is the same CLIP as Load Shapes World (CLIP + VAE)'s."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadShapesWorld",
            display_name="Load Shapes World (text encoder + VAE)",
            category=CATEGORY,
            description="Deprecated: use Load Shapes World (CLIP + VAE) with CLIP Text Encode.",
            inputs=[_text_encoder_input()],
            outputs=[types.WorldText.Output(display_name="world_text"), io.Vae.Output(display_name="vae")],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, text_encoder_name) -> io.NodeOutput:
        return io.NodeOutput(*_load(text_encoder_name))


class WorldTextEncode(io.ComfyNode):
    """Kept for saved workflows: what CLIP Text Encode does with the world's clip."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_WorldTextEncode",
            display_name="Shapes World Text Encode",
            category=CATEGORY,
            description="Deprecated: use CLIP Text Encode with the clip of Load Shapes World (CLIP + VAE).",
            inputs=[
                types.WorldText.Input("world_text", tooltip="From Load Shapes World."),
                io.String.Input("prompt", multiline=True, default="red striped circle moving right",
                                tooltip="Words of the world: a colour (red, green, blue, yellow, magenta, cyan), "
                                        "optionally 'striped', a shape (circle, square, triangle, cross) and "
                                        "'moving left/right/up/down'. Leave empty for the negative prompt."),
            ],
            outputs=[io.Conditioning.Output()],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, world_text, prompt) -> io.NodeOutput:
        return io.NodeOutput(world_text.encode_from_tokens_scheduled(world_text.tokenize(prompt)))


class WorldEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_WorldEmptyLatent",
            display_name="Shapes World Empty Latent",
            category=CATEGORY,
            description="An empty latent of the world's clip size for the sampler.",
            inputs=[
                io.Int.Input("frames", default=5, min=5, max=60, step=5,
                             tooltip="Frames per clip, a multiple of 5 (the world's latent holds 5 frames per "
                                     "latent frame); the world model was trained on 5."),
                io.Int.Input("size", default=32, min=8, max=256, step=2,
                             tooltip="Width and height in pixels; the world model was trained on 32."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips generated at once."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, frames, size, batch_size) -> io.NodeOutput:
        side = size // world_latent.SPATIAL_FACTOR
        length = max(1, frames // world_latent.TEMPORAL_FACTOR)
        return io.NodeOutput({"samples": torch.zeros(batch_size, world_latent.LATENT_CHANNELS, length, side, side)})


def _case_names() -> list[str]:
    return [c.name for c in load_cases()]


class WorldCaseData(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_WorldCaseData",
            display_name="Shapes World Example Data",
            category=CATEGORY,
            description="A customization case of the shapes world as a user would bring it: photos of a subject "
                        "(with masks) and clips of a motion performed by other subjects. Try the training "
                        "workflows with it before using your own photos and clips.",
            inputs=[
                io.Combo.Input("case", options=_case_names(), tooltip="A case from CustVid's default case file."),
                io.Int.Input("motion_clip", default=0, min=0, max=4,
                             tooltip="Which of the case's motion clips to output (0 = the first)."),
            ],
            outputs=[io.Image.Output(display_name="subject_photos"), io.Mask.Output(display_name="subject_masks"),
                     io.Image.Output(display_name="motion_clip"), io.String.Output(display_name="motion_caption",
                                                                       tooltip="The clip's caption with the motion "
                                                                               "trigger word 'mtn'.")],
        )

    @classmethod
    def execute(cls, case, motion_clip) -> io.NodeOutput:
        chosen = {c.name: c for c in load_cases()}.get(case)
        if chosen is None:
            raise InputError("case", f"'{case}' is not in the default case file", f"one of {_case_names()}")
        photos = chosen.subject_images()
        clips = chosen.motion_clips()
        if not 0 <= motion_clip < len(clips):
            raise InputError("motion_clip", f"{motion_clip}", f"0 to {len(clips) - 1} for this case")
        clip = clips[motion_clip]
        return io.NodeOutput(torch.cat([p.frames for p in photos]), torch.cat([p.masks for p in photos]),
                             clip.frames, f"{clip.prompt} {MOTION_WORD}")


def _preservation_schema(node_id: str, text_input, deprecated: bool) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name="Shapes World Preservation Clips",
        category=CATEGORY,
        description=("Deprecated: use the one that takes the clip of Load Shapes World (CLIP + VAE). " if deprecated
                     else "") +
                    "Clips of the world's own vocabulary with their captions, encoded for training: the "
                    "preservation clips of a Subject Dataset (MotionBooth's video preservation loss, and "
                    "the stills a stillness LoRA learns from).",
        inputs=[
            text_input,
            io.Int.Input("count", default=16, min=1, max=64, tooltip="How many clips."),
            # Picks the clips rather than noise: no control, or the frontend would add one set to randomize.
            io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                         tooltip="Which clips (fixed by seed)."),
        ],
        outputs=[types.VideoDataset.Output(display_name="clips")],
        is_deprecated=deprecated,
    )


def _preservation_clips(text: WorldTextEncoder, count: int, seed: int) -> VideoSet:
    clips = vocabulary_clips(text, WorldSpec(), count, seed)
    # In ComfyUI's latent format, as the world's VAE encodes them for Video Clips Dataset.
    return converted(clips, WorldVAE().format.process_out)


class WorldPreservationClipsV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _preservation_schema("CustVid_WorldPreservationClipsV2",
                                    io.Clip.Input("clip", tooltip="From Load Shapes World (captions the clips)."),
                                    deprecated=False)

    @classmethod
    def execute(cls, clip, count, seed) -> io.NodeOutput:
        return io.NodeOutput(_preservation_clips(world_text_encoder(clip), count, seed))


class WorldPreservationClips(io.ComfyNode):
    """Kept for saved workflows (its text encoder input is of the deprecated type)."""

    @classmethod
    def define_schema(cls):
        return _preservation_schema("CustVid_WorldPreservationClips",
                                    types.WorldText.Input("world_text", tooltip="From Load Shapes World."),
                                    deprecated=True)

    @classmethod
    def execute(cls, world_text, count, seed) -> io.NodeOutput:
        return io.NodeOutput(_preservation_clips(world_text_encoder(world_text, "world_text"), count, seed))


NODES = [LoadShapesWorldClip, WorldEmptyLatent, WorldCaseData, WorldPreservationClipsV2,
         LoadShapesWorld, WorldTextEncode, WorldPreservationClips]
