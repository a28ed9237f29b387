"""Training-free subject paths by steering cross-attention with boxes (MotionBooth).

In the text cross-attention of the conditional pass, the subject's tokens get a higher logit inside
the frame's box, `alpha * (1 - box area / frame area)`, while the step is before `tau`; the other
prompt tokens (not the special and padding ones) are suppressed at every step, except an optional
background phrase outside the boxes. The model then draws the subject where the box is.

Boxes are keyframes (normalised xyxy at clip times 0..1) interpolated to every frame, then read at
each latent frame's time and mapped onto its token grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError
from .sampling import AttentionEdit, CrossAttentionCall, SamplingControl, SamplingStep

# Added to suppressed logits: far below any real logit, still finite so fp16 softmax stays defined.
SUPPRESS = -1.0e4


def check_box(box, name: str = "boxes") -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise InputError(name, f"box {list(box)}", "4 numbers x1, y1, x2, y2 (fractions of the frame)")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise InputError(name, f"box {[x1, y1, x2, y2]} leaves the frame", "coordinates between 0 and 1")
    if x2 <= x1 or y2 <= y1:
        raise InputError(name, f"box {[x1, y1, x2, y2]} has x2 <= x1 or y2 <= y1", "x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


@dataclass(frozen=True)
class BoxTrack:
    """A subject box over the clip: `keys` are (at, (x1, y1, x2, y2)) with `at` in [0, 1]."""

    keys: tuple[tuple[float, tuple[float, float, float, float]], ...]

    def __post_init__(self):
        if not self.keys:
            raise InputError("boxes", "no keyframes", "at least one box")
        times = [at for at, _ in self.keys]
        if any(not 0.0 <= t <= 1.0 for t in times) or times != sorted(times) or len(set(times)) != len(times):
            raise InputError("boxes", f"keyframe times {times}", "increasing, distinct times between 0 and 1")
        for _, box in self.keys:
            check_box(box)

    @classmethod
    def parse(cls, text: str) -> BoxTrack:
        """JSON (`[{"at": 0, "box": [x1, y1, x2, y2]}, ...]` or a list of boxes spread evenly over the
        clip) or lines `at: x1, y1, x2, y2`."""
        text = text.strip()
        example = "lines 'at: x1, y1, x2, y2' such as '0: 0.1, 0.1, 0.4, 0.4' and '1: 0.6, 0.6, 0.9, 0.9'"
        try:
            if text.startswith("["):
                data = json.loads(text)
                if data and isinstance(data[0], dict):
                    keys = [(float(k["at"]), tuple(k["box"])) for k in data]
                else:
                    keys = [(i / max(1, len(data) - 1), tuple(b)) for i, b in enumerate(data)]
            else:
                keys = []
                for line in filter(None, (p.strip() for p in text.replace(";", "\n").splitlines())):
                    at, values = line.split(":")
                    keys.append((float(at), tuple(float(v) for v in values.split(","))))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise InputError("boxes", f"could not read '{text}' ({e})", example) from None
        if not keys:
            raise InputError("boxes", "no boxes given", example)
        return cls(tuple((at, check_box(box)) for at, box in keys))

    @classmethod
    def from_masks(cls, masks: torch.Tensor) -> BoxTrack:
        """One keyframe per frame of a `[F, H, W]` mask sequence (frames with an empty mask are skipped)."""
        if masks.ndim != 3:
            raise InputError("masks", f"shape {tuple(masks.shape)}", "[frames, height, width]")
        f, h, w = masks.shape
        keys = []
        for i in range(f):
            ys, xs = torch.nonzero(masks[i] > 0.5, as_tuple=True)
            if len(xs):
                at = i / max(1, f - 1)
                keys.append((at, (float(xs.min()) / w, float(ys.min()) / h, (float(xs.max()) + 1) / w,
                                  (float(ys.max()) + 1) / h)))
        if not keys:
            raise InputError("masks", "every mask is empty", "masks with the subject marked in at least one frame")
        return cls(tuple(keys))

    def at(self, u: float) -> torch.Tensor:
        keys = self.keys
        if u <= keys[0][0]:
            return torch.tensor(keys[0][1])
        for (ta, a), (tb, b) in zip(keys, keys[1:]):
            if u <= tb:
                w = (u - ta) / (tb - ta)
                return torch.tensor(a) * (1 - w) + torch.tensor(b) * w
        return torch.tensor(keys[-1][1])

    def per_frame(self, frames: int) -> torch.Tensor:
        """`[frames, 4]` boxes at frames spread evenly over the clip."""
        return torch.stack([self.at(f / (frames - 1) if frames > 1 else 0.5) for f in range(frames)])

    def to_json(self) -> str:
        return json.dumps([{"at": at, "box": list(box)} for at, box in self.keys])


def cells_in_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[T, 4]` normalised boxes -> `[T, H, W]` True where a cell's centre lies inside its frame's box."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    b = boxes.float()[:, :, None, None]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] <= b[:, 3])


@dataclass
class TokenRoles:
    """Which text positions are what, in a context of `length` positions.

    subject: the subject phrase (boosted in the box); background: an optional phrase kept outside the
    boxes; prompt: every position of the prompt's own words (the ones not listed above are suppressed).
    Special and padding positions are in none of these and are never touched."""

    subject: tuple[int, ...]
    prompt: tuple[int, ...]
    background: tuple[int, ...] = ()

    def check(self, length: int):
        if not self.subject:
            raise InputError("subject_words", "no subject token found", "words that appear in the prompt")
        for name, positions in (("subject_words", self.subject), ("background_words", self.background)):
            if any(not 0 <= p < length for p in positions):
                raise InputError(name, f"token positions {list(positions)}", f"positions below {length}")


@dataclass
class BoxSteering:
    """Box-steered cross-attention for one prompt.

    `boxes` gives the subject's box over the clip; `alpha` the boost; `tau` the fraction of the
    sampling steps it lasts (MotionBooth: alpha 10, tau 15 of 50 steps = 0.3); `blocks` the blocks
    steered (None: all)."""

    boxes: BoxTrack
    tokens: TokenRoles
    alpha: float = 10.0
    tau: float = 0.3
    blocks: frozenset[int] | None = None
    suppress_others: bool = True

    def __post_init__(self):
        self._cache: dict[tuple, torch.Tensor] = {}  # a sampler asks for the same edit at every block and step
        if not 0.0 <= self.alpha <= 100.0:
            raise InputError("alpha", f"{self.alpha}", "a boost between 0 and 100 (MotionBooth uses 5 to 10)")
        if not 0.0 <= self.tau <= 1.0:
            raise InputError("tau", f"{self.tau}", "a fraction of the sampling steps between 0 and 1")

    def steers(self, block: int) -> bool:
        return self.blocks is None or block in self.blocks

    def edit(self, grid: tuple[int, int, int], key_length: int, progress: float, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> AttentionEdit:
        """How to run one cross-attention call at `progress`. While a query-dependent term is active (the
        boost before tau, or a background phrase) a logit bias; otherwise suppressing words is the same as
        leaving them out (the text keys carry no positions), so the call runs unmasked on fewer keys."""
        if progress < self.tau or (self.suppress_others and self.tokens.background):
            return AttentionEdit(bias=self.logit_bias(grid, key_length, progress, dtype, device))
        if not self.suppress_others:
            return AttentionEdit()
        key = ("keep", key_length)
        if key not in self._cache:
            muted = set(self.tokens.prompt) - set(self.tokens.subject)
            self._cache[key] = torch.tensor([i for i in range(key_length) if i not in muted], dtype=torch.long)
        return AttentionEdit(keep=self._cache[key].to(device))

    def logit_bias(self, grid: tuple[int, int, int], key_length: int, progress: float,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[T*H*W, key_length]` additive logits for tokens in (t, y, x) order, at `progress` (fraction
        of the sampling steps done)."""
        key = (tuple(grid), key_length, progress < self.tau, dtype, str(device))
        if key not in self._cache:
            self._cache[key] = self._logit_bias(grid, key_length, progress).to(device=device, dtype=dtype)
        return self._cache[key]

    def _logit_bias(self, grid: tuple[int, int, int], key_length: int, progress: float) -> torch.Tensor:
        t, h, w = grid
        boxes = self.boxes.per_frame(t)
        inside = cells_in_boxes(boxes, h, w).reshape(-1)  # [L]
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).repeat_interleave(h * w)  # [L]
        bias = torch.zeros(t * h * w, key_length)
        roles = self.tokens
        if progress < self.tau:
            boost = torch.where(inside, self.alpha * (1 - area), torch.zeros(()))
            bias[:, list(roles.subject)] += boost[:, None]
        if self.suppress_others:
            others = sorted(set(roles.prompt) - set(roles.subject) - set(roles.background))
            bias[:, others] = SUPPRESS
            if roles.background:
                bias[:, list(roles.background)] = torch.where(inside, SUPPRESS, 0.0)[:, None]
        return bias


def word_positions(prompt_tokens: list, word_tokens: dict[str, list], name: str, prompt: str) -> tuple[int, ...]:
    """Positions in `prompt_tokens` of each word's token sequence (every occurrence); `word_tokens` maps
    each word to its tokens."""
    found: list[int] = []
    for text, word in word_tokens.items():
        n = len(word)
        hits = [i for i in range(len(prompt_tokens) - n + 1) if n and prompt_tokens[i:i + n] == word]
        if not hits:
            raise InputError(name, f"'{text}' is not in the prompt '{prompt}'", "words that appear in the prompt")
        for i in hits:
            found += range(i, i + n)
    return tuple(sorted(set(found)))


class PromptSteering(SamplingControl):
    """Box steering as a sampling control: in the text cross-attention, the i-th conditional row of the batch
    follows `steerings[i % len(steerings)]` (one per prompt; a single one steers every prompt)."""

    def __init__(self, steerings: Sequence[BoxSteering]):
        if not steerings:
            raise InputError("steering", "none given", "at least one box steering")
        self.steerings = list(steerings)

    def attention_edit(self, step: SamplingStep, call: CrossAttentionCall) -> dict[int, AttentionEdit] | None:
        n = len(self.steerings)
        return {row: s.edit(call.grid, call.key_length, step.progress, call.dtype, call.device)
                for i, row in enumerate(step.conditional_rows) if (s := self.steerings[i % n]).steers(call.block)}
