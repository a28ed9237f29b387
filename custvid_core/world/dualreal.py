"""DualReal on the shapes world: identity and motion adapters trained jointly on a case, weighed by the StageBlender
controller, generated as "sks mtn" with the adapters and the controller attached.

It learns from the same sets as the LoRA methods (`customize.subject_set`, `customize.motion_set`). The motion
adapters run unconditioned by default; `image_condition="dino"` conditions them on the world's DINOv2 CLS feature
(of each motion clip's first frame in training, of the subject's photos, averaged, as the reference at inference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.dualreal import DualRealWeights, save_dualreal
from ..adapters.parts import attached
from ..adapters.stage_blender import StageBlenderPart, dualreal_parts
from ..errors import InputError
from ..training.datasets import SubjectSet, VideoSet
from ..training.dualreal import DualRealSettings, ImageEmbeddings, dualreal_weights, train_dualreal
from .cases import Case
from .customize import MOTION_WORD, SUBJECT_WORD, _quiet, _training_bar, motion_set, subject_set
from .latent import decode
from .model import World
from .sample import generate

IMAGE_CONDITIONS = (None, "dino")


@dataclass
class DualRealMethod:
    """A benchmark method: DualReal's adapters and controller trained on a case, generated together. After
    `prepare`, `workdir/diagnostics.json` holds the loss of every training step (by task) and, for each generation,
    the controller's identity weight per group of blocks at every sampling step (the conditional rows' mean)."""

    name: str
    settings: DualRealSettings = field(default_factory=DualRealSettings)
    image_condition: str | None = None  # IMAGE_CONDITIONS: None, or "dino" (the world's DINOv2 CLS feature)
    hue_copies: int = 0  # copies of each motion clip in other colours
    moving_clips: int = 0  # clips of each subject photo sliding along a straight path, learned with the photos
    sampling_steps: int = 30
    cfg: float = 4.0
    encoders: dict = field(default_factory=dict)  # "dino": the loaded world encoder
    progress_bars: bool = False  # a tqdm bar while training (the benchmark runs without)

    def __post_init__(self):
        if self.image_condition not in IMAGE_CONDITIONS:
            raise InputError("image_condition", f"'{self.image_condition}'", f"one of {IMAGE_CONDITIONS}")

    def prepare(self, world: World, case: Case, workdir: Path):
        workdir = Path(workdir)
        subject = subject_set(world, case, preservation=0, moving_clips=self.moving_clips)
        clips = motion_set(world, case, hue_copies=self.hue_copies)
        embeddings = self._embeddings(subject, clips) if self.image_condition else None
        trained = train_dualreal(world.backbone, subject, clips, self.settings, embeddings, workdir=workdir / "dualreal",
                                 progress=_training_bar("DualReal") if self.progress_bars else None)
        weights = dualreal_weights(trained, self.settings.name)
        save_dualreal(workdir / f"{case.name}_dualreal.safetensors", weights)
        reference = None if embeddings is None else embeddings.subject
        diagnostics = {"history": trained.history, "controller_identity_weights": {}}

        def run(prompts, seed):
            per_step: list[list[float]] = []
            clips_out = generate_with_dualreal(world, weights, prompts, seed, reference, per_step,
                                               steps=self.sampling_steps, cfg=self.cfg)
            diagnostics["controller_identity_weights"][str(seed)] = per_step
            (workdir / "diagnostics.json").write_text(json.dumps(diagnostics))
            return clips_out

        (workdir / "diagnostics.json").write_text(json.dumps(diagnostics))
        return run, {"subject": SUBJECT_WORD, "motion": MOTION_WORD}

    def _embeddings(self, subject: SubjectSet, clips: VideoSet) -> ImageEmbeddings:
        from ..representations.subject import extract_subject, load_dinov2
        from .encoders import DINO_FILE

        if "dino" not in self.encoders:
            self.encoders["dino"] = load_dinov2(DINO_FILE)
        dino = self.encoders["dino"]

        def cls(frames: torch.Tensor) -> torch.Tensor:
            return extract_subject(dino, frames, resolution=frames.shape[1], fit="stretch", progress=_quiet).cls_token

        with torch.no_grad():
            first_frames = decode(clips.latents)[:, 0]  # every clip as trained, its colour copies included
            photos = decode(subject.latents)[:, 0]
        # One reference for all the subject's rows (photos and their moving clips), as at inference.
        return ImageEmbeddings(cls(first_frames), cls(photos).mean(0, keepdim=True))


def generate_with_dualreal(world: World, weights: DualRealWeights, prompts: list[str], seed: int,
                           reference: torch.Tensor | None = None, identity_weights: list | None = None,
                           **sampling) -> torch.Tensor:
    """Generate with a trained DualReal attached (`reference`: the motion adapters' image embedding, where they were
    trained with one); the world model is unchanged afterwards. `identity_weights`: a list that receives, at every
    sampling step, the controller's identity weight per group (mean over the prompts' conditional rows)."""
    parts = dualreal_parts(weights)
    controller = next((p for p in parts if isinstance(p, StageBlenderPart)), None)
    rows = len(prompts)

    def progress(step: int, total: int) -> None:
        if identity_weights is not None and controller is not None:
            identity_weights.append(controller.identity_weights()[:rows].mean(0).tolist())

    with attached(world.backbone, parts):
        parts[1].set_condition(reference)
        return generate(world, prompts, seed=seed, progress=progress, **sampling)
