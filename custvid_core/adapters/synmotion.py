"""SynMotion's dual embeddings: learnable subject and motion residuals on a prompt's conditioning, and a refiner.

The prompt's conditioning is split by role: the rows of the subject words and the rows of the motion words
(positions found with the text encoder's own tokenizer, as for a trigger embedding; this module takes the
positions). Each role's rows get a learnable residual, a code through a zero-initialised projection (SynMotion's
`e = [e_mot + Z(e_mot^l), e_sub + Z(e_sub^l)]`), then the embedding refiner: a small MLP over the edited rows with
its own zero-initialised output, added back (`e' = e + R(e)`). At the start the conditioning is exactly the text
encoder's. `SynMotionEmbeddingPart` trains them on a backbone; `with_embeddings` applies trained ones to any
conditioning.

Choices the paper leaves open, and what this module does:

- Subject residual: ONE row (a random seeded code), added to every subject token. The subject prior clips'
  prompts name other subjects ("a cat", "a horse") that tokenize to other counts, and the subject residual
  learns on those too, so it cannot be one row per token.
- Motion residual: one row per motion token (the user's motion words are fixed). Each token's code starts at
  the MEAN of the whole motion phrase's conditioning rows: the paper starts from "the embedding of the whole
  phrase", one vector, and the mean does not depend on how the phrase alone tokenizes (with or without an end
  token) against how its words tokenize inside the prompt. The code is as wide as the conditioning (the paper's
  zero-initialised convolution maps the embedding's width to itself); the subject's code is `CODE_DIM` wide, as
  the trigger embedding's.
- Refiner: one refiner for both roles, per token (the paper refines the concatenated embedding; per token it
  applies to any count of rows), `LayerNorm -> Linear(text_dim, REFINER_HIDDEN) -> SiLU -> Linear(->text_dim)`,
  the last zero-initialised. The LayerNorm makes it indifferent to the encoder's scale (umt5's rows and the
  shapes world's differ by orders of magnitude). It runs on the rows that got a residual, and belongs to the
  MOTION group: the paper's prior-clip steps update "only the subject embedding", so the refiner learns only on
  the motion steps, where both embeddings learn.
- At inference (`with_embeddings`): for a NEW subject doing the motion, the motion residual and the refiner on
  the motion rows only; the subject residual is off by default, because what it absorbed of the training clips'
  subject is exactly what must not carry over to another subject. For YOUR subject doing the motion (with a
  subject LoRA and its trigger embedding from the subject recipe), the same: the subject rows take your trigger
  embedding, not this subject residual. `subject=True` adds it (to the prompt's subject words, whatever they
  are) to regenerate the training clips' own subject.
- A prompt whose motion words tokenize to another number of tokens than in training is refused (naming
  `motion_words`): the motion residual has one row per token, and spreading it over other tokens would be a
  silently different embedding. The caller finds the positions with the tokenizer, so words that tokenize
  differently inside the new prompt are not found there and are refused the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .embedding import CODE_DIM, TextEditPart, TriggerEmbedding, add_at
from .parts import Exported, StrengthValue, built_unseeded, seeded_linear_init

KIND = "synmotion_embeddings"
REFINER_HIDDEN = 256
INPUT = "synmotion_embeddings"
REFINER_KEYS = {f"{layer}.{p}" for layer in ("norm", "inp", "out") for p in ("weight", "bias")}


@dataclass(frozen=True)
class RolePositions:
    """Where a prompt's subject and motion words sit in its conditioning (an empty role gets no residual)."""

    subject: tuple[int, ...] = ()
    motion: tuple[int, ...] = ()

    def __post_init__(self):
        if set(self.subject) & set(self.motion):
            raise InputError("motion_words", f"positions {sorted(set(self.subject) & set(self.motion))} are both "
                             "subject and motion words", "subject words and motion words that do not overlap")


class Refiner(nn.Module):
    """Per row: `x + out(silu(inp(norm(x))))`, `out` zero at first (so the identity)."""

    def __init__(self, text_dim: int, hidden: int = REFINER_HIDDEN):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.inp = nn.Linear(text_dim, hidden)
        self.out = nn.Linear(hidden, text_dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows + self.out(nn.functional.silu(self.inp(self.norm(rows))))


def new_refiner(text_dim: int, seed: int) -> Refiner:
    refiner = built_unseeded(lambda: Refiner(text_dim))
    seeded_linear_init(refiner, torch.Generator().manual_seed(seed))
    refiner.norm.reset_parameters()
    with torch.no_grad():
        refiner.out.weight.zero_()
        refiner.out.bias.zero_()
    return refiner


def pooled_phrase(motion_phrase: torch.Tensor, text_dim: int) -> torch.Tensor:
    """`[text_dim]`: the mean of the motion phrase's conditioning rows (`[tokens, text_dim]`, or `[1, L, text_dim]`
    as an encoder gives it), leaving out all-zero rows (umt5's padding, the shapes world's)."""
    rows = motion_phrase.reshape(-1, motion_phrase.shape[-1]) if motion_phrase.ndim else motion_phrase
    if rows.ndim == 2:
        rows = rows[rows.abs().sum(-1) > 0]
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[-1] != text_dim:
        raise InputError("motion_phrase", f"a tensor of shape {tuple(motion_phrase.shape)}"
                         + (" with only zero rows" if rows.ndim == 2 and rows.shape[-1] == text_dim else ""),
                         f"the motion phrase's conditioning rows, [tokens, {text_dim}], not all padding")
    return rows.float().mean(0)


def edit_rows(context: torch.Tensor, positions: RolePositions, subject: torch.Tensor | None,
              motion: torch.Tensor | None, refiner: nn.Module | None, scale: StrengthValue = 1.0) -> torch.Tensor:
    """`context` `[B, L, D]` with `subject` (`[1, D]`, every subject row) and `motion` (`[motion tokens, D]`) added
    at their positions (None or no positions: that role untouched), then the refiner on the edited rows; each
    addition times `scale`. A new tensor; the rows elsewhere are the input's."""
    if motion is not None and positions.motion and motion.shape[0] != len(positions.motion):
        raise InputError("motion_words", f"{len(positions.motion)} motion tokens in the prompt, the embedding "
                         f"was learned on {motion.shape[0]}", "the motion words as they were written in training "
                         "(they tokenize to as many tokens)")
    rows: list[int] = []
    residuals: list[torch.Tensor] = []
    for role, residual in ((positions.subject, subject), (positions.motion, motion)):
        if not role or residual is None:
            continue
        if residual.shape[-1] != context.shape[-1]:
            raise InputError(INPUT, f"width {residual.shape[-1]} on conditioning of width {context.shape[-1]}",
                             "embeddings trained with this text encoder")
        if any(not 0 <= i < context.shape[1] for i in role):
            raise InputError(INPUT, f"positions {list(role)} in a conditioning of {context.shape[1]} rows",
                             "the positions of the prompt's words in this conditioning")
        rows += role
        residuals.append(residual.expand(len(role), -1))  # the subject's one row goes to each of its tokens
    if not rows:
        return context
    edited = add_at(context, rows, torch.cat(residuals) * scale)
    if refiner is None:
        return edited
    at = edited[:, rows]
    dtype = next(refiner.parameters()).dtype
    change = torch.zeros_like(edited)  # per batch row, unlike the residuals
    change[:, rows] = (refiner(at.to(dtype)).to(context.dtype) - at) * scale
    return edited + change


class SynMotionEmbeddings(nn.Module):
    """The trainable form: a subject code (random, seeded) and motion codes (the phrase's embedding), each through a
    zero-initialised projection, and the refiner (or none)."""

    def __init__(self, motion_tokens: int, text_dim: int, phrase: torch.Tensor, refiner: bool = True, seed: int = 0):
        super().__init__()
        self.subject = TriggerEmbedding(1, text_dim, CODE_DIM, seed=seed)
        self.motion = TriggerEmbedding(motion_tokens, text_dim, code_dim=text_dim, seed=seed)
        with torch.no_grad():  # its random code is replaced: the motion starts from the phrase it names
            self.motion.code.copy_(phrase.expand(motion_tokens, -1))
        self.refiner = new_refiner(text_dim, seed) if refiner else None


class SynMotionEmbeddingPart(TextEditPart):
    """The dual embeddings as a training part, in two groups: `<name>_subject` (the subject residual) and
    `<name>_motion` (the motion residual and the refiner), so a prior-clip step can update the subject alone.
    While attached, every forward's text context gets the residuals at `positions` (the training prompt's; a
    step on another prompt sets its own with `set_positions`, an empty role gets nothing), times the strength."""

    kind = KIND

    def __init__(self, name: str, positions: RolePositions, text_dim: int, motion_phrase: torch.Tensor,
                 subject_words: str = "", motion_words: str = "", refiner: bool = True, seed: int = 0):
        super().__init__(name)
        if not positions.motion:
            raise InputError("motion_words", "no motion token found", "motion words that appear in the prompt")
        self.positions, self.text_dim, self.refiner, self.seed = positions, text_dim, refiner, seed
        self.subject_tokens, self.motion_tokens = len(positions.subject), len(positions.motion)  # the training prompt's
        self.phrase = pooled_phrase(motion_phrase, text_dim)
        self.subject_words, self.motion_words = subject_words, motion_words
        self.module: SynMotionEmbeddings | None = None

    def set_positions(self, positions: RolePositions) -> None:
        """The rows the next forwards edit (a step's own prompt)."""
        self.positions = positions

    def _build(self) -> nn.Module:
        return SynMotionEmbeddings(self.motion_tokens, self.text_dim, self.phrase, self.refiner, self.seed)

    def _edited(self, context: torch.Tensor, scale: StrengthValue) -> torch.Tensor:
        m = self.module
        return edit_rows(context, self.positions, m.subject.residual(), m.motion.residual(), m.refiner, scale)

    def groups(self) -> dict[str, list[nn.Parameter]]:
        super().groups()  # refuses a detached part
        m = self.module
        motion = [*m.motion.parameters(), *(m.refiner.parameters() if m.refiner is not None else ())]
        return {f"{self.name}_subject": list(m.subject.parameters()), f"{self.name}_motion": motion}

    def export(self) -> Exported:
        return self.learned().exported()

    def learned(self) -> LearnedSynMotion:
        m = self.module
        with torch.no_grad():
            refiner = None if m.refiner is None else {k: v.detach().cpu().clone() for k, v in m.refiner.state_dict().items()}
            return LearnedSynMotion(m.subject.residual().cpu(), m.motion.residual().cpu(), refiner,
                                    self.subject_words, self.motion_words, self.subject_tokens)


@dataclass
class LearnedSynMotion:
    """Trained dual embeddings: the residuals, the refiner's weights (None: trained without), and the words of the
    training prompt (with the subject's token count there)."""

    subject_residual: torch.Tensor  # [1, text_dim]
    motion_residual: torch.Tensor  # [motion tokens, text_dim]
    refiner: dict[str, torch.Tensor] | None
    subject_words: str = ""
    motion_words: str = ""
    subject_tokens: int = 0

    @property
    def text_dim(self) -> int:
        return self.motion_residual.shape[-1]

    def metadata(self) -> dict:
        return {"subject_words": self.subject_words, "motion_words": self.motion_words, "text_dim": self.text_dim,
                "subject_tokens": self.subject_tokens, "motion_tokens": self.motion_residual.shape[0],
                "refiner": self.refiner is not None, "refiner_hidden": REFINER_HIDDEN if self.refiner else 0}

    def exported(self) -> Exported:
        tensors = {"subject_residual": self.subject_residual, "motion_residual": self.motion_residual,
                   **{f"refiner.{k}": v for k, v in (self.refiner or {}).items()}}
        return Exported(KIND, tensors, self.metadata())

    @classmethod
    def from_exported(cls, exported: Exported, input_name: str = INPUT) -> LearnedSynMotion:
        """From the part's file form (what a training run returns, or a file's tensors and metadata)."""
        tensors, meta = exported.tensors, exported.metadata
        subject, motion = tensors.get("subject_residual"), tensors.get("motion_residual")
        if exported.kind != KIND or subject is None or motion is None or subject.ndim != 2 or motion.ndim != 2:
            raise InputError(input_name, "these are not SynMotion embeddings", "a file written by Save SynMotion Embeddings")
        refiner = {k.removeprefix("refiner."): v.float() for k, v in tensors.items() if k.startswith("refiner.")}
        if refiner and set(refiner) != REFINER_KEYS:
            raise InputError(input_name, f"refiner weights {sorted(refiner)}", "a refiner as Train SynMotion writes it")
        return cls(subject.float(), motion.float(), refiner or None, meta.get("subject_words", ""),
                   meta.get("motion_words", ""), int(meta.get("subject_tokens", 0)))

    def refiner_module(self, device=None, dtype=torch.float32) -> Refiner | None:
        if self.refiner is None:
            return None
        refiner = built_unseeded(lambda: Refiner(self.text_dim, self.refiner["inp.weight"].shape[0]))
        refiner.load_state_dict(self.refiner)
        return refiner.to(device=device, dtype=dtype)


def with_embeddings(context: torch.Tensor, positions: RolePositions, learned: LearnedSynMotion, subject: bool = False,
                    strength: float = 1.0) -> torch.Tensor:
    """`context` (any prompt's conditioning, `[B, L, text_dim]`) with the learned motion residual at
    `positions.motion`, and the subject residual at `positions.subject` only if `subject` (see the module's
    notes), then the refiner on those rows. A new tensor, outside autograd: a sampler that runs without no_grad would
    otherwise chain every step's graph through the refiner's weights."""
    if context.shape[-1] != learned.text_dim:
        raise InputError(INPUT, f"width {learned.text_dim} on conditioning of width {context.shape[-1]}",
                         "embeddings trained with this text encoder")
    if not positions.motion:
        raise InputError("motion_words", "no motion token found", "motion words that appear in the prompt")
    if subject and not positions.subject:
        raise InputError("subject_words", "no subject token found", "subject words that appear in the prompt")
    device, dtype = context.device, context.dtype
    with torch.no_grad():
        return edit_rows(context, positions, learned.subject_residual.to(device, dtype) if subject else None,
                         learned.motion_residual.to(device, dtype), learned.refiner_module(device), strength)


def save_synmotion(path: str | os.PathLike, learned: LearnedSynMotion) -> Path:
    exported = learned.exported()
    return save_safetensors(path, exported.tensors, {"custvid.kind": KIND,
                                                     **{f"custvid.{k}": v for k, v in exported.metadata.items()}})


def load_synmotion(path: str | os.PathLike, text_dim: int | None = None, input_name: str = INPUT) -> LearnedSynMotion:
    """The embeddings in `path`; refused (naming `input_name`) if it is not such a file, or, with `text_dim`, if
    they were trained on conditioning of another width."""
    tensors, meta = load_safetensors(path, input_name)
    if meta.get("custvid.kind") != KIND:
        raise InputError(input_name, f"'{Path(path).name}' is not a CustVid SynMotion embeddings file",
                         "a file written by Save SynMotion Embeddings")
    words = {"custvid.subject_words", "custvid.motion_words"}  # saved as they are; the other values as JSON
    try:
        metadata = {k.removeprefix("custvid."): v if k in words else json.loads(v) for k, v in meta.items()
                    if k.startswith("custvid.") and k != "custvid.kind"}
    except json.JSONDecodeError:
        raise InputError(input_name, f"'{Path(path).name}' has damaged metadata",
                         "a file written by Save SynMotion Embeddings") from None
    learned = LearnedSynMotion.from_exported(Exported(KIND, tensors, metadata), input_name)
    if text_dim is not None and learned.text_dim != text_dim:
        raise InputError(input_name, f"embeddings of width {learned.text_dim} for a text encoder of width {text_dim}",
                         "embeddings trained with this text encoder")
    return learned
