"""Per-step adapter strengths while sampling (SMRABooth's sparse "timing").

A schedule is piecewise constant over the fraction of sampling steps done: `((0.0, 0.6), (0.3, 0.8))`
means 0.6 for the first 30% of the steps, then 0.8. SMRABooth's preset: the subject LoRA at 0.6
for the first 15 of 50 steps (layout forms before the subject's details), then 0.8; the motion LoRA
at 1.0 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class StrengthSchedule:
    points: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def __post_init__(self):
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
            if ":" not in text:
                return cls.constant(float(text))
            pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",") if part.strip()]
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
        fraction = step / max(1, steps)
        value = self.points[0][1]
        for start, strength in self.points:
            if fraction + 1e-9 >= start:
                value = strength
        return value


SMRABOOTH_TIMING = {"subject": StrengthSchedule(((0.0, 0.6), (0.3, 0.8))),
                    "motion": StrengthSchedule.constant(1.0)}
