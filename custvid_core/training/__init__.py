"""Training: the shared loop (checkpoints, resume, schedules), the objectives, the data sets and the recipes."""

from .customize import (
    MotionSettings,
    SubjectSettings,
    TrainedLora,
    train_joint,
    train_motion,
    train_subject,
)
from .datasets import MovingClips, SubjectSet, VideoSet, append_clips, append_photos, clip_set, subject_set
from .loop import OptimSettings, StepResult, TrainingStopped, train
from .objectives import SigmaSampler

__all__ = ["MotionSettings", "MovingClips", "OptimSettings", "SigmaSampler", "StepResult", "SubjectSet",
           "SubjectSettings", "TrainedLora", "TrainingStopped", "VideoSet", "append_clips", "append_photos",
           "clip_set", "subject_set", "train", "train_joint", "train_motion", "train_subject"]
