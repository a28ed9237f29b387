"""Controls applied while sampling: per-step adapter strengths (later: camera shift, box steering)."""

from .strength import SMRABOOTH_TIMING, StrengthSchedule

__all__ = ["SMRABOOTH_TIMING", "StrengthSchedule"]
