"""Controls applied while sampling: per-step adapter strengths (later: camera shift, box steering)."""

from .strength import SMRABOOTH_TIMING, ScheduledLora, StrengthSchedule, step_fraction

__all__ = ["SMRABOOTH_TIMING", "ScheduledLora", "StrengthSchedule", "step_fraction"]
