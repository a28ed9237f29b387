"""The saved form of a representation: one safetensors file whose metadata says what it holds."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..errors import InputError
from ..files import load_safetensors, save_safetensors

FORMAT_VERSION = 1
KIND_KEY = "custvid.kind"
FORMAT_KEY = "custvid.format"
FIELDS_KEY = "custvid.fields"


def save_representation(rep, path: str | os.PathLike) -> Path:
    """Write a representation dataclass: tensor fields as tensors, the rest as JSON metadata.

    Optional tensor fields that are None are simply absent from the file.
    """
    tensors, fields = {}, {}
    for f in dataclasses.fields(rep):
        value = getattr(rep, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value
        else:
            fields[f.name] = value
    return save_safetensors(path, tensors, {KIND_KEY: rep.kind, FORMAT_KEY: str(FORMAT_VERSION),
                                            FIELDS_KEY: json.dumps(fields)})


def load_representation(path: str | os.PathLike, expected_kind: str | None = None,
                        input_name: str = "representation"):
    """Load a file written by `save_representation`; the class is chosen by the stored kind."""
    from .motion import MotionRepresentation
    from .subject import SubjectRepresentation

    classes = {c.kind: c for c in (SubjectRepresentation, MotionRepresentation)}
    tensors, meta = load_safetensors(path, input_name)
    kind = meta.get(KIND_KEY)
    if kind not in classes:
        raise InputError(input_name, f"'{Path(path).name}' is not a CustVid representation file",
                         "a file written by CustVid's Save Representation")
    if expected_kind is not None and kind != expected_kind:
        raise InputError(input_name, f"'{Path(path).name}' holds a {kind} representation",
                         f"a {expected_kind} representation file")
    if int(meta.get(FORMAT_KEY, "0")) > FORMAT_VERSION:
        raise InputError(input_name, f"'{Path(path).name}' was written by a newer CustVid",
                         f"format {FORMAT_VERSION} or older; update CustVid to read it")
    cls = classes[kind]
    fields = json.loads(meta.get(FIELDS_KEY, "{}"))
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in {**fields, **tensors}.items() if k in names}
    for f in dataclasses.fields(cls):  # optional tensors saved as absent
        values.setdefault(f.name, None)
    return cls(**values)
