"""Nodes for the shapes world: the small embedded model a new user runs first.

ComfyUI's own UNETLoader loads the world's Wan 2.1 file (CustVid adds its folder to
`diffusion_models`); these nodes add what a real Wan gets from umt5 and its VAE: the world's
text encoder (CONDITIONING) and its fixed pixel <-> latent map (a VAE for VAEEncode/VAEDecode).
"""

from __future__ import annotations

import comfy.latent_formats
import folder_paths
import torch
from comfy_api.latest import io

from ..custvid_core.errors import InputError
from ..custvid_core.training.datasets import converted
from ..custvid_core.world import latent as world_latent
from ..custvid_core.world.cases import load_cases
from ..custvid_core.world.customize import MOTION_WORD, vocabulary_clips
from ..custvid_core.world.model import load_text_encoder
from ..custvid_core.world.scene import WorldSpec
from . import types
from .host import model_files

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


class LoadShapesWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadShapesWorld",
            display_name="Load Shapes World (text encoder + VAE)",
            category=CATEGORY,
            description="The shapes world's text encoder and pixel<->latent map. Load its diffusion "
                        "model with ComfyUI's Load Diffusion Model (custvid_shapes_world_wan21.safetensors).",
            inputs=[io.Combo.Input("text_encoder_name", options=model_files("custvid_world_text"),
                                   tooltip="The world's text encoder, shipped with CustVid.")],
            outputs=[types.WorldText.Output(display_name="world_text"), io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, text_encoder_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("custvid_world_text", text_encoder_name)
        return io.NodeOutput(load_text_encoder(path, input_name="text_encoder_name"), WorldVAE())


class WorldTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_WorldTextEncode",
            display_name="Shapes World Text Encode",
            category=CATEGORY,
            description="Turns a shapes-world prompt into CONDITIONING for the world model.",
            inputs=[
                types.WorldText.Input("world_text", tooltip="From Load Shapes World."),
                io.String.Input("prompt", multiline=True, default="red striped circle moving right",
                                tooltip="Words of the world: a colour (red, green, blue, yellow, magenta, cyan), "
                                        "optionally 'striped', a shape (circle, square, triangle, cross) and "
                                        "'moving left/right/up/down'. Leave empty for the negative prompt."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, world_text, prompt) -> io.NodeOutput:
        with torch.no_grad():
            context = world_text(prompt.strip())
        return io.NodeOutput([[context, {}]])


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


class WorldPreservationClips(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_WorldPreservationClips",
            display_name="Shapes World Preservation Clips",
            category=CATEGORY,
            description="Clips of the world's own vocabulary with their captions, encoded for training: the "
                        "preservation clips of a Subject Dataset (MotionBooth's video preservation loss, and "
                        "the stills a stillness LoRA learns from).",
            inputs=[
                types.WorldText.Input("world_text", tooltip="From Load Shapes World (captions the clips)."),
                io.Int.Input("count", default=16, min=1, max=64, tooltip="How many clips."),
                # Picks the clips rather than noise: no control, or the frontend would add one set to randomize.
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Which clips (fixed by seed)."),
            ],
            outputs=[types.VideoDataset.Output(display_name="clips")],
        )

    @classmethod
    def execute(cls, world_text, count, seed) -> io.NodeOutput:
        clips = vocabulary_clips(world_text, WorldSpec(), count, seed)
        # In ComfyUI's latent format, as the world's VAE encodes them for Video Clips Dataset.
        return io.NodeOutput(converted(clips, WorldVAE().format.process_out))


NODES = [LoadShapesWorld, WorldTextEncode, WorldEmptyLatent, WorldCaseData, WorldPreservationClips]
