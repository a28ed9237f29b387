"""Training: the shared loop (checkpoints, resume, schedules), the engine that runs recipes' tasks on their parts,
the objectives, and the recipes."""

from .customize import (
    MotionSettings,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    train_joint,
    train_motion,
    train_subject,
)
from .engine import TrainedParts
from .loop import OptimSettings, StepResult, TrainingStopped, train
from .objectives import SigmaSampler
from .tasks import Cycle, Random, Recipe, Stages, Task

__all__ = ["Cycle", "MotionSettings", "OptimSettings", "Random", "Recipe", "SigmaSampler", "Stages", "StepResult",
           "SubjectSet", "SubjectSettings", "Task", "TrainedParts", "TrainingStopped", "VideoSet", "train",
           "train_joint", "train_motion", "train_subject"]
