"""Training: the shared loop (checkpoints, resume, schedules), the objectives, and the recipes."""

from .customize import (
    MotionSettings,
    SubjectSet,
    SubjectSettings,
    TrainedLora,
    VideoSet,
    train_joint,
    train_motion,
    train_subject,
)
from .loop import OptimSettings, StepResult, TrainingStopped, train
from .objectives import SigmaSampler

__all__ = ["MotionSettings", "OptimSettings", "SigmaSampler", "StepResult", "SubjectSet", "SubjectSettings",
           "TrainedLora", "TrainingStopped", "VideoSet", "train", "train_joint", "train_motion", "train_subject"]
