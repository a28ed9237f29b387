"""The sampling contract: what a control sees of a sampling step, and where it may act.

Every sampler that CustVid drives (the world's `sample_flow`, ComfyUI's samplers through `nodes/comfy_sampling.py`)
describes each step as a `SamplingStep` and calls a control's hooks:

- `before_step(step)`: change the model before the step (adapter strengths, a controller's weights). A host may
  call the model more than once per step, so this must give the same state when called again for the same step.
- `after_step(step, x) -> x`: change the latent after the step (the camera's latent shift).
- `attention_edit(step, call) -> {row: AttentionEdit} | None`: change the text cross-attention of some batch rows
  (box steering); `attend_edited` applies the edits.

A control overrides only the hooks it needs; `Controls` runs several as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingStep:
    """Step `index` of a schedule of `count` steps, from `sigma` to `sigma_next`. `conditional_rows`: the batch
    rows of the model call that carry the prompt (the others are the unconditional pass of guidance)."""

    index: int
    count: int
    sigma: float
    sigma_next: float
    conditional_rows: tuple[int, ...] = ()

    @property
    def progress(self) -> float:
        """The fraction of the schedule's steps done before this one: how far sampling has got, for every control."""
        return self.index / max(1, self.count)

    @classmethod
    def of(cls, index: int, sigmas: torch.Tensor, conditional_rows: Sequence[int] = ()) -> SamplingStep:
        """Step `index` of the schedule `sigmas` (`count + 1` noise levels, the last one where sampling ends)."""
        return cls(index, len(sigmas) - 1, float(sigmas[index]), float(sigmas[index + 1]), tuple(conditional_rows))

    @classmethod
    def at_sigma(cls, sigma: float, sigmas: torch.Tensor | None,
                 conditional_rows: Sequence[int] = ()) -> SamplingStep:
        """The step of `sigmas` whose noise level is nearest `sigma` (a host that only tells the model its sigma).
        Without a schedule (the model called outside a sampler) the call is the one step from `sigma` to 0."""
        if sigmas is None or len(sigmas) < 2:
            sigmas = torch.tensor([sigma, 0.0])
        index = int((sigmas[:-1].float().cpu() - sigma).abs().argmin())
        return cls.of(index, sigmas, conditional_rows)


def conditional_rows(chunks: Sequence[int], batch: int) -> tuple[int, ...]:
    """The rows of a batch of `len(chunks)` equal chunks that carry the prompt: chunk i is conditional where
    `chunks[i]` is 0 and unconditional where it is 1 (ComfyUI's `cond_or_uncond`; the world's sampler runs
    `[0, 1]` under guidance, `[0]` without)."""
    per_chunk = batch // len(chunks)
    return tuple(c * per_chunk + i for c, kind in enumerate(chunks) if kind == 0 for i in range(per_chunk))


@dataclass(frozen=True)
class CrossAttentionCall:
    """One text cross-attention call: its block, the token grid `(t, h, w)` of the queries, the keys' length
    (the text context) and the dtype/device an edit's tensors should have."""

    block: int
    grid: tuple[int, int, int]
    key_length: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"


@dataclass
class AttentionEdit:
    """A change to one cross-attention call: a logit bias `[Lq, Lk]`, or the keys to keep (the others dropped)."""

    bias: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def changes(self) -> bool:
        return self.bias is not None or self.keep is not None


class SamplingControl:
    """A control of sampling; each hook does nothing unless a control overrides it (see the module's text)."""

    def before_step(self, step: SamplingStep) -> None:
        pass

    def after_step(self, step: SamplingStep, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention_edit(self, step: SamplingStep, call: CrossAttentionCall) -> dict[int, AttentionEdit] | None:
        return None


def _overrides(control: SamplingControl, hook: str) -> bool:
    return getattr(type(control), hook) is not getattr(SamplingControl, hook)


class Controls(SamplingControl):
    """Several controls as one, in order: every `before_step`; `after_step` each on the latent the one before
    left; the attention edits of all (a batch row may be edited by one control only)."""

    def __init__(self, controls: Sequence[SamplingControl] = ()):
        self.controls = list(controls)
        self._editing = [c for c in self.controls if _overrides(c, "attention_edit")]

    @property
    def edits_attention(self) -> bool:
        return bool(self._editing)

    def before_step(self, step):
        for control in self.controls:
            control.before_step(step)

    def after_step(self, step, x):
        for control in self.controls:
            x = control.after_step(step, x)
        return x

    def attention_edit(self, step, call):
        edits: dict[int, AttentionEdit] = {}
        for control in self._editing:
            for row, edit in (control.attention_edit(step, call) or {}).items():
                if row in edits:
                    raise InputError("controls", f"two controls edit the cross-attention of batch row {row}",
                                     "one attention-editing control per prompt")
                edits[row] = edit
        return edits or None


class LatentView(SamplingControl):
    """Runs a control's `after_step` on another view of the latent, e.g. frames a latent packs in its channels:
    `unpack(x)` gives the view, `pack(view, x)` the latent back in x's layout."""

    def __init__(self, control: SamplingControl, unpack: Callable[[torch.Tensor], torch.Tensor],
                 pack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.control, self.unpack, self.pack = control, unpack, pack

    def after_step(self, step, x):
        return self.pack(self.control.after_step(step, self.unpack(x)), x)


def attend_edited(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  edits: dict[int, AttentionEdit]) -> torch.Tensor:
    """`attend(q, k, v, mask)` over a batch where rows in `edits` (the conditional pass) get their edit and
    the other rows run unchanged, batched (the host's fast path). `k`/`v` may be the same tensor."""
    n = q.shape[0]
    edits = {i: e for i, e in edits.items() if e.changes}
    plain = [i for i in range(n) if i not in edits]
    if not edits:
        return attend(q, k, v, None)
    outputs = {}
    for i, e in edits.items():
        ki, vi = k[i:i + 1], v[i:i + 1]
        if e.keep is not None:
            ki, vi = ki[:, e.keep], vi[:, e.keep]
        outputs[i] = attend(q[i:i + 1], ki, vi, None if e.bias is None else e.bias[None])
    first = next(iter(outputs.values()))
    out = first.new_empty((n, *first.shape[1:]))
    for i, o in outputs.items():
        out[i] = o[0]
    if plain:
        out[plain] = attend(q[plain], k[plain], v[plain], None)
    return out


def cross_attention_hook(control: SamplingControl, current: Callable[[], SamplingStep],
                         grid: tuple[int, int, int]) -> Callable:
    """A backbone's text cross-attention hook (`text_cross_attention`) that applies `control`'s edits at the step
    `current()` returns, for queries on the token grid `grid`."""
    def hook(block, attend, hidden_states, context):
        call = CrossAttentionCall(block, grid, context.shape[1], hidden_states.dtype, hidden_states.device)
        edits = control.attention_edit(current(), call)
        if not edits:
            return None
        return attend_edited(lambda q, k, _v, bias: attend(q, k, bias), hidden_states, context, context, edits)

    return hook
