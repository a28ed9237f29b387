"""Per-step adapter strengths while sampling (SMRABooth's sparse "timing").

A schedule is piecewise constant over the sampling progress (the fraction of the steps done): `((0.0, 0.6), (0.3, 0.8))`
means 0.6 for the first 30% of the steps, then 0.8. SMRABooth's preset: the subject LoRA at 0.6
for the first 15 of 50 steps (layout forms before the subject's details), then 0.8; the motion LoRA
at 1.0 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..adapters.lora import NATIVE_PREFIX, native_lora_factors
from ..errors import InputError
from .sampling import SamplingControl, SamplingStep


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

    def at(self, progress: float) -> float:
        """The strength at a step's `progress` (`SamplingStep.progress`)."""
        value = self.points[0][1]
        for start, strength in self.points:
            if progress + 1e-9 >= start:
                value = strength
        return value


SMRABOOTH_TIMING = {"subject": StrengthSchedule(((0.0, 0.6), (0.3, 0.8))),
                    "motion": StrengthSchedule.constant(1.0)}


class StrengthTarget(Protocol):
    """Anything whose adapters' strengths can be set by name: the library's LoRA adapters, a host's unmerged LoRA."""

    def set_strength(self, name: str, strength: float) -> None: ...


class ScheduledStrengths(SamplingControl):
    """Before each step, sets each named adapter of `target` to its schedule's strength at the step's progress."""

    def __init__(self, target: StrengthTarget, schedules: dict[str, StrengthSchedule]):
        self.target, self.schedules = target, dict(schedules)

    def before_step(self, step: SamplingStep) -> None:
        for name, schedule in self.schedules.items():
            self.target.set_strength(name, schedule.at(step.progress))


class UnmergedLora:
    """A LoRA file applied unmerged, `W + s * alpha / rank * up @ down`, through a host's per-layer weight
    functions (`weight_function(module)`, applied to the layer's weight at each forward), so that its strength s
    can change between steps: a `StrengthTarget` with one adapter, `name`."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "lora", input_name: str = "lora"):
        self.name, self.strength = name, 1.0
        self.layers = {NATIVE_PREFIX + module: factors
                       for module, factors in native_lora_factors(tensors, input_name).items()}
        if not self.layers:
            raise InputError(input_name, "holds no LoRA weights under 'diffusion_model.' names",
                             "a Wan LoRA with '.lora_down.weight' / '.lora_up.weight' keys")

    def set_strength(self, name: str, strength: float) -> None:
        if name != self.name:
            raise InputError("adapter", f"'{name}' is not this LoRA", f"'{self.name}'")
        self.strength = strength

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
