"""Nodes that keep an encoded dataset on disk (models/custvid/datasets): encoded once with the VAE and text encoder,
then trained from without either loaded. A cache is refused when the VAE or text encoder connected to the load node
is not the one that encoded it."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..custvid_core.errors import InputError
from ..custvid_core.training.dataset_cache import MadeBy, load_dataset, read_made_by, save_dataset
from ..custvid_core.training.datasets import Bucketed, SubjectSet, VideoSet, buckets_of
from ..custvid_core.training.fingerprint import content_digest, model_signature
from . import types
from .host import model_files, safetensors_path, show_on_node

FOLDER = "custvid_datasets"
CATEGORY = "CustVid/training data"


def vae_print(vae) -> tuple[str, str]:
    """A VAE's fingerprint (its weights' signature) and name (its model's class)."""
    module = getattr(vae, "first_stage_model", None)
    if isinstance(module, torch.nn.Module):
        return model_signature(module), type(module).__name__
    # A VAE without weights (an exact pixel <-> latent map) is known by its kind and strides.
    strides = (vae.spacial_compression_encode(), vae.temporal_compression_decode())
    return content_digest(type(vae).__name__, *strides), type(vae).__name__


def text_encoder_print(clip) -> tuple[str, str]:
    """A text encoder's (CLIP's) fingerprint and name."""
    module = getattr(clip, "cond_stage_model", None)
    if not isinstance(module, torch.nn.Module):
        raise InputError("clip", "holds no text encoder model", "a CLIP from a text encoder loader")
    return model_signature(module), type(module).__name__


def _summary(data, path_name: str) -> str:
    item = "clips" if isinstance(buckets_of(data)[0], VideoSet) else "photos"
    lines = data.describe(item) if isinstance(data, Bucketed) else \
        [f"{data.latents.shape[0]} {item} of latent size {'x'.join(map(str, data.latents.shape[2:]))}"]
    return f"{path_name}:\n" + "\n".join(lines)


class SaveDatasetCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveDatasetCache",
            display_name="Save Dataset Cache",
            category=CATEGORY,
            description="Writes an encoded dataset (latents, prompts, masks, representations, buckets, start images "
                        "and CLIP features for image-to-video) to "
                        "models/custvid/datasets, with what encoded it, so later runs train from it (Load Dataset "
                        "Cache) without the VAE or the text encoder.",
            is_output_node=True,
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE the dataset was encoded with (recorded in the file)."),
                io.Clip.Input("clip", tooltip="The text encoder its prompts were encoded with (recorded in the file)."),
                io.String.Input("filename", default="custvid/my_dataset",
                                tooltip="Name under models/custvid/datasets (sub-folders allowed); .safetensors is "
                                        "added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name."),
                types.VideoDataset.Input("clips", optional=True,
                                         tooltip="Clips from Video Clips Dataset. Connect this or subject."),
                types.SubjectDataset.Input("subject", optional=True,
                                           tooltip="A subject from Subject Dataset (with its preservation clips). "
                                                   "Connect this or clips."),
            ],
            outputs=[io.String.Output(display_name="dataset_name")],
        )

    @classmethod
    def execute(cls, vae, clip, filename, overwrite, clips=None, subject=None) -> io.NodeOutput:
        if (clips is None) == (subject is None):
            raise InputError("clips" if clips is None else "subject", "both or neither of clips and subject are "
                             "connected", "one dataset: clips or subject")
        data = clips if clips is not None else subject
        root, path = safetensors_path(FOLDER, filename, "filename", overwrite)
        (vae_fp, vae_name), (text_fp, text_name) = vae_print(vae), text_encoder_print(clip)
        save_dataset(path, data, MadeBy(vae_fp, text_fp, vae_name, text_name))
        name = path.relative_to(root).as_posix()
        text = _summary(data, name)
        show_on_node(text)
        return io.NodeOutput(name, ui=ui.PreviewText(text))


def _load(kind: type, dataset_name: str, vae, clip):
    path = folder_paths.get_full_path_or_raise(FOLDER, dataset_name)
    expect = MadeBy(vae_print(vae)[0] if vae is not None else None,
                    text_encoder_print(clip)[0] if clip is not None else None)
    data = load_dataset(path, expect, "dataset_name")
    if not isinstance(buckets_of(data)[0], kind):
        holds = "clips" if kind is SubjectSet else "a subject"
        node = "Load Dataset Cache (clips)" if kind is SubjectSet else "Load Dataset Cache (subject)"
        raise InputError("dataset_name", f"'{dataset_name}' holds {holds}", f"a cache of this kind, or {node}")
    made_by = read_made_by(path, "dataset_name")
    text = _summary(data, dataset_name) + f"\nencoded by {made_by.vae_name} and {made_by.text_encoder_name}"
    show_on_node(text)
    return io.NodeOutput(data, ui=ui.PreviewText(text))


def _load_inputs() -> list:
    return [
        io.Combo.Input("dataset_name", options=model_files(FOLDER),
                       tooltip="A file in models/custvid/datasets, written by Save Dataset Cache."),
        io.Vae.Input("vae", optional=True,
                     tooltip="Optional: the VAE of the model you train; a cache encoded by another VAE is refused. "
                             "Not needed to train."),
        io.Clip.Input("clip", optional=True,
                      tooltip="Optional: the text encoder you use; a cache whose prompts another encoded is refused. "
                              "Not needed to train."),
    ]


class LoadVideoDatasetCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadVideoDatasetCache",
            display_name="Load Dataset Cache (clips)",
            category=CATEGORY,
            description="Loads clips saved by Save Dataset Cache, for Train Motion LoRA or as preservation clips; "
                        "neither the VAE nor the text encoder needs to be loaded.",
            inputs=_load_inputs(),
            outputs=[types.VideoDataset.Output(display_name="clips")],
        )

    @classmethod
    def execute(cls, dataset_name, vae=None, clip=None) -> io.NodeOutput:
        return _load(VideoSet, dataset_name, vae, clip)


class LoadSubjectDatasetCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadSubjectDatasetCache",
            display_name="Load Dataset Cache (subject)",
            category=CATEGORY,
            description="Loads a subject saved by Save Dataset Cache, for Train Subject LoRA; neither the VAE nor "
                        "the text encoder needs to be loaded.",
            inputs=_load_inputs(),
            outputs=[types.SubjectDataset.Output(display_name="subject")],
        )

    @classmethod
    def execute(cls, dataset_name, vae=None, clip=None) -> io.NodeOutput:
        return _load(SubjectSet, dataset_name, vae, clip)


NODES = [SaveDatasetCache, LoadVideoDatasetCache, LoadSubjectDatasetCache]
