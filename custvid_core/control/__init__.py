"""Controls applied while sampling, each written once against the sampling contract (`sampling.py`): per-step
adapter strengths, the camera's latent shift, box steering."""

from .sampling import AttentionEdit, Controls, CrossAttentionCall, LatentView, SamplingControl, SamplingStep
from .strength import SMRABOOTH_TIMING, ScheduledStrengths, StrengthSchedule, UnmergedLora

__all__ = ["SMRABOOTH_TIMING", "AttentionEdit", "Controls", "CrossAttentionCall", "LatentView", "SamplingControl",
           "SamplingStep", "ScheduledStrengths", "StrengthSchedule", "UnmergedLora"]
