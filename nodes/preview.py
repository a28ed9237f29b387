"""Previews while a train node trains: every `preview_every` steps a short clip of the dataset's caption (or the node's
`preview_prompt`) sampled by ComfyUI's own sampler with the adapters as they are, shown on the node as its progress
preview, kept in the run's folder (previews/, indexed) and listed in the node's UI output at the end.

A preview is kept cheap so it can run often: 10 Euler steps at cfg 1 (one model call a step, no negative prompt),
at most 5 latent frames (17 frames on Wan, about a second: enough to see a motion start) of the training data's size
with its longer side at most 52 latent cells (416 pixels on Wan). A preview then takes the time of three or four
training steps (measured on the shapes world). It is a look at how training goes, not the quality a full sampling
gives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import comfy.model_management
import comfy.sample
import comfy.utils
import numpy as np
import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui
from PIL import Image

from ..custvid_core.errors import InputError
from ..custvid_core.media import contact_sheet, to_uint8
from ..custvid_core.training.datasets import buckets_of
from ..custvid_core.training.loop import PREVIEW_INDEX, PREVIEWS_FOLDER, PreviewClip

PREVIEW_STEPS = 10
PREVIEW_SEED = 0
MAX_LATENT_FRAMES = 5
MAX_LATENT_SIDE = 52


def preview_inputs(text_encoder: bool = True, vae: bool = True) -> list:
    """A train node's preview inputs, optional and last; `text_encoder` / `vae`: also a `clip` / `vae` input (for
    a node that lacks one)."""
    return [
        io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                     tooltip="Every N steps, sample a short preview clip with the adapters as they are: shown on this "
                             "node while it trains, kept in the run's folder (output/custvid_training/<run_name>/"
                             "previews/) and marked on the loss graph. 10 steps at cfg 1, at most 17 frames, at most "
                             "416 pixels on the longer side: about the time of 3 or 4 training steps. 0: off."),
        io.String.Input("preview_prompt", default="", optional=True,
                        tooltip="The previews' prompt (needs clip). Empty: the dataset's own caption (a clips "
                                "dataset's first clip's)."),
        *([io.Clip.Input("clip", optional=True,
                         tooltip="For preview_prompt: the text encoder of the model you train.")] if text_encoder else []),
        *([io.Vae.Input("vae", optional=True,
                        tooltip="For previews: the VAE of the model you train, to decode them. Without it a preview "
                                "shows the latent's rough colours (ComfyUI's latent preview).")] if vae else []),
    ]


def previewer(patcher, data, preview_every: int, prompt: str, clip, vae, steps: int
              ) -> Callable[[int, dict], PreviewClip] | None:
    """The engine's `preview(step, parts)` for a train node, or None with preview_every 0: samples `patcher` (the
    loaded training clone, its diffusion model carrying the run's adapters) for the prompt (empty: the caption of
    `data`, the dataset as its node made it; its first bucket's, in size buckets) on an empty latent like that
    set's, decodes it with `vae` (or
    ComfyUI's latent-to-RGB preview), shows it as the node's progress preview at the step and returns it for the run's
    folder."""
    if not preview_every:
        return None
    if prompt.strip() and clip is None:
        raise InputError("clip", "is not connected while preview_prompt is set",
                         "the text encoder connected, or preview_prompt empty (the dataset's caption)")
    data = buckets_of(data)[0]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt)) if prompt.strip() else [[data.context[:1], {}]]
    empty = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(_preview_shape(data.latents)))
    latent_format = patcher.model.latent_format
    if vae is None and latent_format.latent_rgb_factors is None:
        raise InputError("vae", "is not connected and this model's latents have no preview colours",
                         "the VAE of the model you train connected, or preview_every 0")
    decode = (lambda latents: _decoded(vae, latents)) if vae is not None else _latent_colours(patcher.model)
    bar = comfy.utils.ProgressBar(steps)

    def preview(step: int, parts: dict) -> PreviewClip:
        noise = comfy.sample.prepare_noise(empty, PREVIEW_SEED)
        latents = comfy.sample.sample(patcher, noise, PREVIEW_STEPS, 1.0, "euler", "simple", positive, [], empty,
                                      callback=_interrupt_point, disable_pbar=True, seed=PREVIEW_SEED)
        frames = decode(latents)
        bar.update_absolute(step, steps, ("JPEG", _still(frames), args.preview_size))
        return PreviewClip(frames, prompt.strip() or "(the dataset's caption)", PREVIEW_SEED)

    return preview


def preview_ui(run_folders: tuple[str, ...], text: str) -> dict:
    """The train node's UI output: its notes, and the latest preview of each of its runs (an animated WebP in
    ComfyUI's output folder), if any."""
    import folder_paths

    shown = {"text": (text,)}
    latest = []
    for run_folder in run_folders:
        try:
            entries = json.loads((Path(run_folder) / PREVIEWS_FOLDER / PREVIEW_INDEX).read_text())
        except (OSError, ValueError):
            continue
        if entries:
            latest.append(Path(run_folder) / entries[-1]["file"])
    if not latest:
        return shown
    output = folder_paths.get_output_directory()
    return {**shown, **ui.SavedImages([ui.SavedResult(file.name, file.parent.relative_to(output).as_posix(),
                                                      io.FolderType.output) for file in latest],
                                      is_animated=True).as_dict()}


def _preview_shape(latent: torch.Tensor) -> tuple[int, ...]:
    """One item of the dataset's latents `[N, C, T, H, W]`, at most MAX_LATENT_FRAMES frames and MAX_LATENT_SIDE
    cells on its longer side (even sizes: Wan's 2x2 patches)."""
    _, channels, frames, height, width = latent.shape
    scale = min(1.0, MAX_LATENT_SIDE / max(height, width))
    size = [max(2, 2 * round(side * scale / 2)) if scale < 1 else side for side in (height, width)]
    return 1, channels, min(frames, MAX_LATENT_FRAMES), *size


def _interrupt_point(*_) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def _decoded(vae, latents: torch.Tensor) -> torch.Tensor:
    """Frames `[F, H, W, 3]` in [0, 1], as VAE Decode gives them."""
    images = vae.decode(latents)
    return images.reshape(-1, *images.shape[-3:]).float().cpu().clamp(0, 1)


def _latent_colours(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Every latent frame in ComfyUI's latent-to-RGB preview colours (its Latent2RGB previewer, which shows one frame
    of the model's own latents, as the sampler's previews do)."""
    from latent_preview import Latent2RGBPreviewer

    latent_format = model.latent_format
    colours = Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias,
                                  latent_format.latent_rgb_factors_reshape)

    def frames(latents: torch.Tensor) -> torch.Tensor:
        latents = model.process_latent_in(latents)  # the sampler returns the VAE's latents
        images = [colours.decode_latent_to_preview(latents[:1, :, t:t + 1]) for t in range(latents.shape[2])]
        return torch.stack([torch.from_numpy(np.array(image)) for image in images]).float() / 255

    return frames


def _still(frames: torch.Tensor) -> Image.Image:
    """Up to four of the clip's frames side by side: the progress preview is one image."""
    picked = frames[::max(1, math.ceil(frames.shape[0] / 4))][:4]
    return Image.fromarray(to_uint8(contact_sheet(picked, columns=4)[None])[0])

