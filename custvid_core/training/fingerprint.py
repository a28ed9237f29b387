"""What a training run learned from, as short digests a checkpoint keeps: the data, the base model, the settings.

A rerun resumes a checkpoint only if all three match, so a run name reused with other photos, other
settings or another model never returns the earlier run's LoRA.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn

# Elements hashed per weight tensor: a strided sample tells another checkpoint of the same size apart
# without reading every weight of a 14B model.
WEIGHT_SAMPLE = 4096


def content_digest(*items: Any, sample: int | None = None) -> str:
    """A digest of tensors, numbers, strings, and dataclasses / dicts / sequences of them. Tensors are
    hashed by their bytes (all of them, or a strided `sample` of each), with their shape and dtype."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, items, sample)
    return h.hexdigest()


def model_signature(model: nn.Module, skip: set[str] | frozenset[str] = frozenset()) -> str:
    """The base model's block count and widths (every weight's name, shape and dtype) and a sample of its
    weights. `skip`: weights whose values are not the base's (a host may have merged LoRAs into them);
    their names and shapes still count."""
    h = hashlib.blake2b(digest_size=16)
    for name, weight in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(weight.shape)}{weight.dtype}".encode())
        if name not in skip:
            _feed(h, weight, WEIGHT_SAMPLE)
    return h.hexdigest()


def _feed(h, x: Any, sample: int | None) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().flatten()
        if sample is not None and t.numel() > sample:
            t = t[::t.numel() // sample][:sample]
        h.update(f"<{tuple(x.shape)}{x.dtype}>".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy())
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(type(x).__name__.encode())
        for f in dataclasses.fields(x):
            h.update(f.name.encode())
            _feed(h, getattr(x, f.name), sample)
    elif isinstance(x, dict):
        for k in sorted(x, key=repr):
            _feed(h, k, sample)
            _feed(h, x[k], sample)
    elif isinstance(x, (list, tuple)):
        h.update(f"[{len(x)}".encode())
        for item in x:
            _feed(h, item, sample)
    elif x is None or isinstance(x, (bool, int, float, str, bytes)):
        h.update(repr(x).encode())
    else:  # a host's own object (e.g. a LoRA patch): its type and its tensors, never its address
        h.update(type(x).__name__.encode())
        _feed(h, getattr(x, "weights", None), sample)


def settings_record(settings: Any, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """A dataclass's settings as flat `name: repr` pairs (nested settings as `outer.inner`), so a checkpoint
    can say which setting differs."""
    record: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        # A setting added after checkpoints were written counts only when changed, so those checkpoints resume.
        if f.name in leave_out or (f.metadata.get("recorded") == "if changed" and value == f.default):
            continue
        if dataclasses.is_dataclass(value):
            record.update({f"{f.name}.{k}": v for k, v in settings_record(value).items()})
        else:
            record[f.name] = repr(value)
    return record
