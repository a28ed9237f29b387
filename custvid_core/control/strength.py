"""Per-step adapter strengths while sampling (SMRABooth's sparse "timing").

A schedule is piecewise constant over the fraction of sampling steps done: `((0.0, 0.6), (0.3, 0.8))`
means 0.6 for the first 30% of the steps, then 0.8. SMRABooth's preset: the subject LoRA at 0.6
for the first 15 of 50 steps (layout forms before the subject's details), then 0.8; the motion LoRA
at 1.0 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class StrengthSchedule:
    points: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def __post_init__(self):
        if not all(math.isfinite(v) for point in self.points for v in point):
            raise InputError("strength schedule", f"{list(self.points)}", "finite numbers (no nan or inf)")
        starts = [p[0] for p in self.points]
        if not self.points or starts[0] != 0.0 or starts != sorted(starts) or not all(0 <= s < 1 for s in starts):
            raise InputError("strength schedule", f"{list(self.points)}",
                             "(start fraction, strength) pairs with increasing starts in [0, 1), the first at 0")

    @classmethod
    def constant(cls, strength: float) -> "StrengthSchedule":
        return cls(((0.0, float(strength)),))

    @classmethod
    def parse(cls, text: str) -> "StrengthSchedule":
        """'0.6' or '0:0.6, 0.3:0.8' (start fraction: strength)."""
        try:
            pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",") if part.strip()] \
                if ":" in text else [(0.0, float(text))]
        except ValueError as e:
            raise InputError("strength schedule", f"'{text}'", "a number, or 'start:strength' pairs "
                             "such as '0:0.6, 0.3:0.8'") from e
        if any(len(p) != 2 for p in pairs):
            raise InputError("strength schedule", f"'{text}'", "'start:strength' pairs such as '0:0.6, 0.3:0.8'")
        return cls(tuple(pairs))

    @property
    def is_constant(self) -> bool:
        return len({s for _, s in self.points}) == 1

    def at(self, step: int, steps: int) -> float:
        return self.at_fraction(step / max(1, steps))

    def at_fraction(self, fraction: float) -> float:
        value = self.points[0][1]
        for start, strength in self.points:
            if fraction + 1e-9 >= start:
                value = strength
        return value


SMRABOOTH_TIMING = {"subject": StrengthSchedule(((0.0, 0.6), (0.3, 0.8))),
                    "motion": StrengthSchedule.constant(1.0)}


def step_fraction(sigma: float, sigmas: torch.Tensor | None = None) -> float:
    """How far sampling has got when the model is called at `sigma`: the step's index over the
    schedule's length when the schedule is known, else 1 - sigma (flow models run sigma 1 -> 0)."""
    if sigmas is None or len(sigmas) < 2:
        return min(1.0, max(0.0, 1.0 - sigma))
    index = int((sigmas[:-1].float().cpu() - sigma).abs().argmin())
    return index / (len(sigmas) - 1)


class ScheduledLora:
    """A LoRA applied unmerged, `W + s * alpha / rank * up @ down`, with the strength s following a
    schedule over the sampling steps. `weight_function(module)` gives the per-layer function a host
    applies to a layer's weight at each forward; `set_progress` moves the strength along."""

    def __init__(self, tensors: dict[str, torch.Tensor], schedule: StrengthSchedule):
        self.schedule = schedule
        self.strength = schedule.at_fraction(0.0)
        from ..adapters.lora import NATIVE_PREFIX, native_lora_modules

        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name in native_lora_modules(tensors):
            module = NATIVE_PREFIX + name
            if module + ".lora_down.weight" not in tensors:
                continue
            down, up = tensors[module + ".lora_down.weight"], tensors[module + ".lora_up.weight"]
            alpha = float(tensors.get(module + ".alpha", torch.tensor(float(down.shape[0]))))
            self.layers[module] = (down.float(), up.float(), alpha / down.shape[0])
        if not self.layers:
            raise InputError("lora", "holds no LoRA weights under 'diffusion_model.' names",
                             "a Wan LoRA with '.lora_down.weight' / '.lora_up.weight' keys")

    def set_progress(self, fraction: float) -> None:
        self.strength = self.schedule.at_fraction(fraction)

    def weight_function(self, module: str):
        down, up, scale = self.layers[module]
        on_device: dict = {}

        def apply(weight: torch.Tensor) -> torch.Tensor:
            if self.strength == 0:
                return weight
            key = (weight.device, weight.dtype)
            if key not in on_device:  # the small factors move once; their product is never kept
                on_device[key] = (up.to(weight.device, weight.dtype), down.to(weight.device, weight.dtype))
            u, d = on_device[key]
            return weight + (self.strength * scale) * (u @ d)

        return apply

    def __deepcopy__(self, memo):  # hosts deep-copy model options; the schedule state must stay shared
        return self
