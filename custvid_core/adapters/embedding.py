"""A learnable trigger-word embedding (SynMotion's subject embedding).

The trigger word's rows of the text conditioning get a learnable residual: a random code through a
zero-initialised projection, as SynMotion builds its subject embedding (without its refiner). Training so
starts from the prompt exactly as the text encoder gives it, and the projection's fan-in sets the step size
whatever the scale of the encoder's output (umt5's rows and the shapes world's differ by orders of magnitude).
Once trained, the residual is a fixed `[tokens, text_dim]` tensor added wherever the trigger word sits; it is
saved in a file of its own, beside the LoRA, because a LoRA loader would not know its key.
`TriggerEmbeddingPart` is the embedding as a training part: attached, it edits the text context where it
enters the backbone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..backbones.wan import WanBackbone
from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .parts import Exported, ModulePart, StrengthValue, built_unseeded

CODE_DIM = 256


class TriggerEmbedding(nn.Module):
    def __init__(self, tokens: int, text_dim: int, code_dim: int = CODE_DIM, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.code = nn.Parameter(torch.randn(tokens, code_dim, generator=g))
        self.project = built_unseeded(lambda: nn.Linear(code_dim, text_dim, bias=False))
        nn.init.zeros_(self.project.weight)

    def residual(self) -> torch.Tensor:
        """`[tokens, text_dim]`: what is added to the trigger word's rows."""
        return self.project(self.code)

    def forward(self, context: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        return add_at(context, positions, self.residual())


def add_at(context: torch.Tensor, positions: Sequence[int], residual: torch.Tensor) -> torch.Tensor:
    """`context` `[B, L, D]` with `residual` `[len(positions), D]` added at `positions` (a new tensor)."""
    positions = list(positions)
    if residual.shape[0] != len(positions):
        raise InputError("trigger_embedding", f"{residual.shape[0]} token rows for {len(positions)} trigger tokens",
                         "a prompt whose trigger word has as many tokens as the one it was trained with")
    if context.shape[-1] != residual.shape[-1]:
        raise InputError("trigger_embedding", f"width {residual.shape[-1]} on conditioning of width "
                         f"{context.shape[-1]}", "an embedding trained with this text encoder")
    delta = torch.zeros_like(context)
    delta[:, positions] = residual.to(context)
    return context + delta


KIND = "trigger_embedding"


class TextEditPart(ModulePart):
    """A part that edits the text context where it enters the model (`WanBackbone.edit_text_context`): `_build()`
    makes its module on attach, `_edited(context, strength)` is the edit; at strength 0 the context is left as is."""

    _scale: StrengthValue = 1.0

    def _build(self) -> nn.Module:
        raise NotImplementedError

    def _edited(self, context: torch.Tensor, scale: StrengthValue) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def attach(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        self.module = self._build().to(device)
        handle = backbone.edit_text_context(self._edit)
        try:
            yield
        finally:
            handle.remove()
            self.module = None

    def _edit(self, context: torch.Tensor) -> torch.Tensor:
        if isinstance(self._scale, float) and self._scale == 0.0:
            return context
        return self._edited(context, self._scale)

    def _apply_strength(self, value: StrengthValue) -> None:
        self._scale = float(value) if not isinstance(value, torch.Tensor) else value


class TriggerEmbeddingPart(TextEditPart):
    """A trigger embedding as a part: while attached (and its strength is not 0), the rows `positions` of the
    text context get the embedding's residual (times the strength) before the backbone's text embedding."""

    kind = KIND

    def __init__(self, name: str, positions: Sequence[int], text_dim: int, trigger_words: str = "", seed: int = 0):
        super().__init__(name)
        self.positions, self.text_dim, self.trigger_words, self.seed = tuple(positions), text_dim, trigger_words, seed
        self.module: TriggerEmbedding | None = None

    def _build(self) -> nn.Module:
        return TriggerEmbedding(len(self.positions), self.text_dim, seed=self.seed)

    def _edited(self, context: torch.Tensor, scale: StrengthValue) -> torch.Tensor:
        if isinstance(scale, float) and scale == 1.0:
            return self.module(context, self.positions)
        return add_at(context, self.positions, self.module.residual() * scale)

    def export(self) -> Exported:
        residual = self.module.residual().detach().cpu()
        return Exported(self.kind, {KIND: residual}, {"trigger_words": self.trigger_words})


@dataclass
class LearnedTrigger:
    """A trained trigger embedding and the words of the training prompt it was learned at."""

    residual: torch.Tensor  # [tokens, text_dim]
    trigger_words: str


def save_trigger_embedding(path: str | os.PathLike, trigger: LearnedTrigger) -> Path:
    return save_safetensors(path, {KIND: trigger.residual}, {"custvid.kind": KIND,
                                                             "custvid.trigger_words": trigger.trigger_words})


def load_trigger_embedding(path: str | os.PathLike, input_name: str = "trigger_embedding") -> LearnedTrigger:
    tensors, meta = load_safetensors(path, input_name)
    residual = tensors.get(KIND)
    if meta.get("custvid.kind") != KIND or residual is None or residual.ndim != 2:
        raise InputError(input_name, f"'{Path(path).name}' is not a CustVid trigger embedding",
                         "a file written by Save Trigger Embedding")
    return LearnedTrigger(residual.float(), meta.get("custvid.trigger_words", ""))
