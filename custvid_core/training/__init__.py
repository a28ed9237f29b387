"""Training: the shared loop (checkpoints, resume, schedules), the engine that runs recipes' tasks on their parts,
the data sets and their builders, the objectives, and the recipes."""

from ..backbones.memory import MemorySettings
from .customize import (
    JointController,
    MotionSettings,
    SubjectSettings,
    joint_dualreal,
    train_joint,
    train_motion,
    train_subject,
)
from .datasets import MovingClips, SubjectSet, VideoSet, append_clips, append_photos, clip_set, subject_set
from .dualreal import DualRealSettings, ImageEmbeddings, dualreal_weights, train_dualreal
from .engine import TrainedParts
from .loop import OptimSettings, StepResult, TrainingStopped, train
from .objectives import SigmaSampler
from .synmotion import SynMotionSettings, train_synmotion
from .tasks import Cycle, Random, Recipe, Stages, Task

__all__ = ["Cycle", "DualRealSettings", "ImageEmbeddings", "JointController", "MemorySettings", "MotionSettings",
           "MovingClips", "OptimSettings", "Random", "Recipe", "SigmaSampler", "Stages", "StepResult", "SubjectSet",
           "SubjectSettings", "SynMotionSettings",
           "Task", "TrainedParts", "TrainingStopped", "VideoSet", "append_clips", "append_photos", "clip_set",
           "dualreal_weights", "joint_dualreal", "subject_set", "train", "train_dualreal", "train_joint", "train_motion",
           "train_subject", "train_synmotion"]
