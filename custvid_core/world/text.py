"""The world's text encoder: one learned 4096-d vector per word, padded with zeros like umt5.

Wan's cross-attention has no positions on the text side, so a bag of word vectors carries a
world prompt ("red striped circle moving left") fully. Placeholder words (`sks`, `mtn`, ...) are
in the vocabulary but never in pretraining prompts: customization methods learn them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..control.boxes import TokenRoles, word_positions
from ..errors import InputError
from .scene import COLOURS, DIRECTIONS, SHAPES, TEXTURES

PLACEHOLDERS = ("sks", "mtn", "xqz", "vrb")
VOCABULARY = ("<pad>", *COLOURS, *TEXTURES, *SHAPES, "moving", *DIRECTIONS, "a", "an", "the", "camera",
              "pans", "object", "shape", *PLACEHOLDERS)
TEXT_DIM = 4096  # umt5-xxl's width: what Wan's text_embedding takes
CONTEXT_LENGTH = 16


class WorldTextEncoder(nn.Module):
    def __init__(self, vocabulary=VOCABULARY, dim: int = TEXT_DIM, length: int = CONTEXT_LENGTH):
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.length = length
        self.embedding = nn.Embedding(len(self.vocabulary), dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def tokenize(self, prompt: str) -> list[int]:
        words = prompt.lower().replace(",", " ").split()
        unknown = [w for w in words if w not in self.index or w == "<pad>"]
        if unknown:
            raise InputError("prompt", f"'{unknown[0]}' is not a word of the shapes world",
                             f"words from: {', '.join(self.vocabulary[1:])}")
        if len(words) > self.length:
            raise InputError("prompt", f"{len(words)} words", f"at most {self.length} words")
        return [self.index[w] for w in words]

    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> context `[B, length, 4096]`; positions after the last word are zero ("" is all zero)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.context([self.tokenize(p) for p in prompts])

    def context(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Tokenized prompts -> context `[B, length, 4096]`, zero after each prompt's last word."""
        weight = self.embedding.weight
        out = weight.new_zeros(len(token_ids), self.length, weight.shape[1])
        for i, ids in enumerate(token_ids):
            if ids:
                out[i, : len(ids)] = self.embedding(torch.tensor(ids, device=weight.device))
        return out

    @contextlib.contextmanager
    def word_residual(self, words: str, residual: torch.Tensor):
        """`residual` `[tokens, dim]` (a trained trigger embedding) added to the vectors of `words` while inside:
        a prompt's rows are its words' vectors, so this adds it wherever the words sit."""
        rows = self.tokenize(words)
        if len(rows) != residual.shape[0]:
            raise InputError("trigger_embedding", f"{residual.shape[0]} token rows for '{words}'",
                             f"{len(rows)} rows, one per word")
        saved = self.embedding.weight.data[rows].clone()
        try:
            self.embedding.weight.data[rows] += residual.to(saved)
            yield
        finally:
            self.embedding.weight.data[rows] = saved

    def token_roles(self, prompt: str, subject_words: str, background_words: str = "") -> TokenRoles:
        """Context positions of a prompt's subject and background words, for box steering."""
        ids = self.tokenize(prompt)

        def find(words: str, name: str) -> tuple[int, ...]:
            try:
                return word_positions(ids, {w: self.tokenize(w) for w in words.split()}, name, prompt)
            except InputError as e:
                raise InputError(name, e.problem, e.expected) from None

        return TokenRoles(find(subject_words, "subject_words"), tuple(range(len(ids))),
                          find(background_words, "background_words") if background_words.strip() else ())
