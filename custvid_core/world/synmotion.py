"""SynMotion on the shapes world: the dual embeddings and the motion LoRA trained on a case's motion clips, with the
world's own subject prior clips, generated for a subject the clips never showed as "<subject words> mtn".

The clips are the LoRA methods' (`customize.motion_set`: each captioned "<its subject> mtn"); the motion words are
"mtn" (the motion residual starts from its row), the subject words each clip's own. The prior clips are the world
model's own (`customize.subject_prior_clips`, cached under the work folder), their subject words found with the
world's tokenizer. At generation the motion residual and the refiner edit the motion word's rows of each prompt (the
subject residual stays off: the new subject is not the clips'), with the motion LoRA attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.lora import save_lora
from ..adapters.synmotion import LearnedSynMotion, RolePositions, save_synmotion, with_embeddings
from ..control.strength import StrengthSchedule
from ..training.customize import train_subject
from ..training.engine import TrainedParts
from ..training.synmotion import SynMotionSettings, prior_subject_positions, train_synmotion
from .cases import Case
from .customize import (
    MOTION_WORD,
    SUBJECT_WORD,
    LoraMethod,
    _training_bar,
    generate_with_loras,
    motion_set,
    subject_prior_clips,
    world_fingerprint,
)
from .model import World


@dataclass
class SynMotionMethod:
    """A benchmark method: SynMotion's embeddings and motion LoRA trained on a case's motion clips (and, unless the
    settings turn them off, `prior_clips` clips the world generates itself), generated for the case's subject."""

    name: str
    settings: SynMotionSettings = field(default_factory=SynMotionSettings)
    prior_clips: int = 16
    hue_copies: int = 0  # copies of each motion clip in other colours
    sampling_steps: int = 30
    cfg: float = 4.0
    progress_bars: bool = False  # a tqdm bar while training (the benchmark runs without)
    # Combined use: the subject LoRA (and trigger embedding) as this LoRA method learns it from the case's photos,
    # the LoRAs' strengths following its schedules ("motion": SynMotion's LoRA).
    subject: LoraMethod | None = None

    def prepare(self, world: World, case: Case, workdir: Path):
        workdir = Path(workdir)
        clips = motion_set(world, case, hue_copies=self.hue_copies)
        captions = [f"{c.prompt} {MOTION_WORD}" for c in case.motion_clips()]
        positions = [clip_positions(world, caption, clip.prompt) for caption, clip in zip(captions, case.motion_clips())
                     for _ in range(1 + self.hue_copies)]  # each clip's colour copies follow it, with its caption
        prior, prior_subjects = None, None
        if self.settings.prior:
            prior = subject_prior_clips(world, workdir / "prior_clips", self.prior_clips, steps=self.sampling_steps,
                                        cfg=self.cfg)
            prior_subjects = prior_subject_positions(prior, lambda p: world.text.token_roles(p.text, p.subject).subject)
        with torch.no_grad():
            phrase = world.text(MOTION_WORD)
        trained = train_synmotion(world.backbone, clips, positions, phrase, prior, self.settings, prior_subjects,
                                  world_fingerprint(world), subject_words="", motion_words=MOTION_WORD,
                                  workdir=workdir / "synmotion",
                                  progress=_training_bar("SynMotion") if self.progress_bars else None)
        learned = LearnedSynMotion.from_exported(trained.parts[self.settings.name])
        save_lora(workdir / f"{case.name}_{trained.spec.name}.safetensors", trained.tensors, trained.spec,
                  world.backbone, {"case": case.name, "method": self.name, "steps": len(trained.history),
                                   "trigger": MOTION_WORD})
        save_synmotion(workdir / f"{case.name}_synmotion_embeddings.safetensors", learned)

        subject, schedules = None, None
        if self.subject is not None:
            subject = train_subject(world.backbone, self.subject.subject_data(world, case), self.subject.subject,
                                    workdir / "subject", _training_bar("subject LoRA") if self.progress_bars else None)
            lora_names = {"subject": subject.spec.name, "motion": trained.spec.name}
            schedules = {lora_names[key]: schedule for key, schedule in (self.subject.schedules or {}).items()}

        def run(prompts, seed):
            return generate_with_synmotion(world, trained, learned, prompts, seed, subject, schedules,
                                           steps=self.sampling_steps, cfg=self.cfg)

        subject_words = SUBJECT_WORD if subject is not None else case.subject.get("words", "")
        return run, {"subject": subject_words, "motion": MOTION_WORD}


def clip_positions(world: World, prompt: str, subject_words: str) -> RolePositions:
    """Where `subject_words` and the motion word sit in `prompt`, by the world's tokenizer."""
    return RolePositions(world.text.token_roles(prompt, subject_words).subject,
                         world.text.token_roles(prompt, MOTION_WORD).subject)


def generate_with_synmotion(world: World, trained: TrainedParts, learned: LearnedSynMotion, prompts: list[str],
                            seed: int, subject: TrainedParts | None = None,
                            schedules: dict[str, StrengthSchedule] | None = None, **sampling) -> torch.Tensor:
    """Generate with the motion LoRA (`trained`'s main) attached and the learned motion residual and refiner on each
    prompt's motion word (`with_embeddings`, the subject residual off); with `subject`, its LoRA and trigger embedding
    too, the strengths following `schedules` (by LoRA name). The world model and its text encoder are unchanged
    afterwards (the LoRAs are not merged: unmerging would leave rounding in the weights)."""
    motion = [RolePositions(motion=world.text.token_roles(p, MOTION_WORD).subject) for p in prompts]

    def edit(context: torch.Tensor) -> torch.Tensor:
        # The conditional rows come first, one per prompt; the unconditional rows after them stay as they are.
        rows = [with_embeddings(context[i:i + 1], positions, learned) for i, positions in enumerate(motion)]
        return torch.cat([*rows, context[len(motion):]])

    loras = [t for t in (subject, trained) if t is not None]
    return generate_with_loras(world, loras, prompts, seed, schedules, text_edit=edit, merge=False, **sampling)
