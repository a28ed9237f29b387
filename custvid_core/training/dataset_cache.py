"""Training sets cached on disk: encoded once, trained from many times without the VAE or the text encoder.

A cache is one safetensors file: every tensor of the set (latents, conditioning, masks, DINOv2 tokens, RAFT flow,
stills, moving and preservation clips, an image-to-video model's start images and CLIP features, per bucket) and,
in its metadata, the set's layout (kinds, buckets, trigger words), the format version, and what made it (`MadeBy`:
the VAE's and the text encoder's fingerprints and names). Loading checks the file against the VAE and text encoder
the run will use, where given: latents of another VAE, or conditioning of another text encoder, would train a LoRA
on numbers the model never sees.

    save_dataset("subject.safetensors", subject, MadeBy(vae=vae_print, text_encoder=text_print, vae_name="Wan 2.1"))
    subject = load_dataset("subject.safetensors", expect=MadeBy(vae=vae_print))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .buckets import Bucket
from .datasets import Bucketed, MovingClips, SubjectSet, VideoSet

FORMAT = "custvid.dataset"
FORMAT_VERSION = 2  # 2: start images and CLIP features (image-to-video); version 1 caches, without them, still load


@dataclass(frozen=True)
class MadeBy:
    """What encoded a set: the VAE's and the text encoder's fingerprints (e.g. `fingerprint.model_signature` of
    their weights) and names for messages. In `load_dataset(expect=...)`, a fingerprint left None is not checked."""

    vae: str | None = None
    text_encoder: str | None = None
    vae_name: str = ""
    text_encoder_name: str = ""


def _layout(data, prefix: str, tensors: dict[str, torch.Tensor], skip_preservation: bool = False) -> dict:
    """`data`'s tensors into `tensors` under `prefix`; returns what rebuilds it from them."""
    def put(name: str, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        # safetensors refuses tensors sharing memory: a prompt's one row shared by two buckets is stored twice.
        shared = any(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for u in tensors.values())
        tensors[prefix + name] = t.clone() if shared else t
        return prefix + name

    if isinstance(data, Bucketed):
        first = data.sets[0]
        shared = isinstance(first, SubjectSet) and first.preservation is not None
        return {"kind": "buckets", "labels": [None if b is None else [b.width, b.height, b.frames] for b in data.labels],
                "sets": [_layout(s, f"{prefix}{k}.", tensors, shared) for k, s in enumerate(data.sets)],
                "preservation": _layout(first.preservation, f"{prefix}preservation.", tensors) if shared else None}
    image_to_video = {"start": put("start", getattr(data, "start", None)),
                      "clip_features": put("clip_features", getattr(data, "clip_features", None))}
    if type(data) is VideoSet:
        return {"kind": "clips", "latents": put("latents", data.latents), "context": put("context", data.context),
                "flow": put("flow", data.flow), "stills": put("stills", data.stills), **image_to_video}
    if type(data) is MovingClips:
        return {"kind": "moving", "latents": put("latents", data.latents), "context": put("context", data.context),
                "masks": put("masks", data.masks), "photo": put("photo", data.photo), **image_to_video}
    if type(data) is SubjectSet:
        keep = data.preservation is not None and not skip_preservation
        return {"kind": "photos", "latents": put("latents", data.latents), "context": put("context", data.context),
                **image_to_video,
                "masks": put("masks", data.masks), "dino_tokens": put("dino_tokens", data.dino_tokens),
                "subject_tokens": None if data.subject_tokens is None else list(data.subject_tokens),
                "trigger_words": data.trigger_words,
                "moving": None if data.moving is None else _layout(data.moving, prefix + "moving.", tensors),
                "preservation": _layout(data.preservation, prefix + "preservation.", tensors) if keep else None}
    raise InputError("dataset", f"a {type(data).__name__}", "a clips or subject dataset (Video Clips Dataset, "
                     "Subject Dataset)")


def _rebuilt(layout: dict, tensors: dict[str, torch.Tensor], preservation=None):
    """The set `layout` describes, from `tensors`."""
    def get(key: str) -> torch.Tensor | None:
        return None if layout.get(key) is None else tensors[layout[key]]  # a version 1 cache has no start images

    kind = layout["kind"]
    if kind == "buckets":
        shared = None if layout["preservation"] is None else _rebuilt(layout["preservation"], tensors)
        return Bucketed(tuple(_rebuilt(s, tensors, shared) for s in layout["sets"]),
                        tuple(None if b is None else Bucket(*b) for b in layout["labels"]))
    if kind == "clips":
        return VideoSet(get("latents"), get("context"), get("flow"), get("stills"), get("start"), get("clip_features"))
    if kind == "moving":
        return MovingClips(get("latents"), get("context"), get("masks"), get("photo"), get("start"),
                           get("clip_features"))
    if kind == "photos":
        if layout["preservation"] is not None:
            preservation = _rebuilt(layout["preservation"], tensors)
        tokens = layout["subject_tokens"]
        return SubjectSet(get("latents"), get("context"), get("masks"), get("dino_tokens"), preservation,
                          None if tokens is None else tuple(tokens), layout["trigger_words"],
                          None if layout["moving"] is None else _rebuilt(layout["moving"], tensors), get("start"),
                          get("clip_features"))
    raise KeyError(kind)


def _items(data) -> dict[str, int]:
    kind = "clips" if isinstance(data.sets[0] if isinstance(data, Bucketed) else data, VideoSet) else "photos"
    sets = data.sets if isinstance(data, Bucketed) else (data,)
    return {kind: sum(s.latents.shape[0] for s in sets)}


def save_dataset(path: str | os.PathLike, data, made_by: MadeBy) -> Path:
    """Write `data` (a `VideoSet`, `SubjectSet` or `Bucketed` set of them) to the safetensors file `path`, atomically
    (a failed write leaves no file, and an earlier file there whole), with `made_by` in its metadata."""
    if not made_by.vae or not made_by.text_encoder:
        raise InputError("made_by", "the VAE's or the text encoder's fingerprint is missing",
                         "the fingerprints of the VAE and the text encoder that encoded the set")
    tensors: dict[str, torch.Tensor] = {}
    layout = _layout(data, "", tensors)
    buckets = data.describe() if isinstance(data, Bucketed) else []
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layout": layout, "buckets": buckets,
                "items": _items(data), "vae": made_by.vae, "text_encoder": made_by.text_encoder,
                "vae_name": made_by.vae_name, "text_encoder_name": made_by.text_encoder_name}
    return save_safetensors(path, tensors, metadata)


def _made_by(meta: dict[str, str]) -> MadeBy:
    return MadeBy(meta.get("vae"), meta.get("text_encoder"), meta.get("vae_name", ""), meta.get("text_encoder_name", ""))


def read_made_by(path: str | os.PathLike, input_name: str = "file") -> MadeBy:
    """What made the cache at `path`, read from its metadata alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return _made_by(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for damaged files
        raise InputError(input_name, f"'{Path(path).name}' is not a readable safetensors file ({e})",
                         "a complete dataset cache written by Save Dataset Cache") from e


def load_dataset(path: str | os.PathLike, expect: MadeBy | None = None, input_name: str = "file"):
    """The set saved at `path`. `expect`: the VAE and text encoder fingerprints the run will use; a cache made by
    another is refused, naming what made it. A damaged, truncated or foreign file is refused with its name."""
    path = Path(path)
    tensors, meta = load_safetensors(path, input_name)
    expected = "a dataset cache written by Save Dataset Cache (save_dataset)"
    if meta.get("format") != FORMAT:
        raise InputError(input_name, f"'{path.name}' is not a CustVid dataset cache", expected)
    version = meta.get("format_version", "")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise InputError(input_name, f"'{path.name}' is a dataset cache of format {version or 'unknown'}",
                         f"format {FORMAT_VERSION} or older: update CustVid to read it, or encode the dataset again")
    made_by = _made_by(meta)
    for what, given, saved, name in (("vae", expect and expect.vae, made_by.vae, made_by.vae_name),
                                     ("clip", expect and expect.text_encoder, made_by.text_encoder,
                                      made_by.text_encoder_name)):
        if given and given != saved:
            kind = "VAE" if what == "vae" else "text encoder"
            raise InputError(what, f"'{path.name}' was encoded by another {kind} ({name or 'unnamed'}, "
                             f"fingerprint {saved})", f"the {kind} that encoded the cache, or encode the dataset "
                             f"again with this one")
    try:
        return _rebuilt(json.loads(meta["layout"]), tensors)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise InputError(input_name, f"'{path.name}' is damaged: its layout does not match its tensors ({e})",
                         expected) from e
