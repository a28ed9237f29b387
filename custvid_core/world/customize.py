"""Customization on the shapes world: a case's subject photos and motion clips as cached training
sets, and the LoRA methods the benchmark compares (plain LoRA up to the full SMRABooth recipe).

The subject is learned under the placeholder word `sks`, the motion under `mtn`; a case's prompts
are then generated as "sks mtn" with both LoRAs attached.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters.embedding import save_trigger_embedding
from ..adapters.lora import LoraAdapters, save_lora
from ..control.strength import ScheduledStrengths, StrengthSchedule
from ..errors import InputError
from ..training import datasets
from ..training.customize import (
    MotionSettings,
    SubjectSettings,
    train_joint,
    train_motion,
    train_subject,
)
from ..training.datasets import SubjectSet, VideoSet
from ..training.engine import TrainedParts
from ..training.fingerprint import content_digest, model_signature
from ..training.loop import OptimSettings
from ..training.objectives import DecodedFlow
from ..training.prior_clips import PriorClips, PriorPrompt, PriorSettings, prior_clips
from .cases import Case
from .latent import TEMPORAL_FACTOR, decode, encode, encode_stills
from .model import World
from .sample import generate, generate_latents
from .scene import WorldSpec, random_scene, render

SUBJECT_WORD, MOTION_WORD = "sks", "mtn"


def vocabulary_clips(text, spec: WorldSpec, count: int, seed: int = 0) -> VideoSet:
    """`count` clips of the world's own vocabulary (seen colours, shapes, textures, straight motions),
    deterministic by seed, captioned with `text` (the world's text encoder), with every frame also as a still:
    preservation clips for a subject (MotionBooth's video preservation loss; the stillness LoRA's stills)."""
    if count < 1:
        raise InputError("count", f"{count}", "at least 1 clip")
    g = torch.Generator().manual_seed(seed)
    rendered = [render(random_scene(g, spec), spec) for _ in range(count)]
    with torch.no_grad():
        context = text([c.prompt for c in rendered])
    return datasets.clip_set(torch.stack([c.frames for c in rendered]), encode, context, stills=None,
                    encode_still=encode_stills, progress=_quiet)


def prior_prompts(count: int, seed: int = 0) -> list[PriorPrompt]:
    """`count` prompts of the world's own vocabulary as subject ("red striped circle") and action ("moving left"),
    deterministic by seed: the world's "<subject class> <common action>" prompts for subject prior clips."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        scene = random_scene(g)
        subject, _, direction = scene.prompt().rpartition(" moving ")
        prompts.append(PriorPrompt(subject, f"moving {direction}"))
    return prompts


def world_fingerprint(world: World) -> str:
    """The world's model and text encoder, as the digest a cache of what they generated is kept by."""
    return content_digest(model_signature(world.backbone.model), world.text.embedding.weight)


def subject_prior_clips(world: World, cache_dir: str | Path, count: int = 16, seed: int = 0, steps: int = 30,
                        cfg: float = 4.0, prompts: list[PriorPrompt] | None = None, progress=None) -> PriorClips:
    """`count` clips the world model itself generates (`sample.generate_latents`, the model frozen) for `prompts`
    (default: `count` prompts of its own vocabulary, `prior_prompts`), cached in `cache_dir` by the model, its text
    encoder, the prompts and the settings; a rerun with the same ones reads the cache. (`vocabulary_clips` renders
    the ground truth instead.)"""
    if count < 1:
        raise InputError("count", f"{count}", "at least 1 clip")
    prompts = prior_prompts(count, seed) if prompts is None else prompts
    spec = world.spec
    settings = PriorSettings(count, seed, spec.size, spec.size, spec.frames, steps, cfg, (("shift", 3.0),))
    base_model = world_fingerprint(world)

    def generate(index: int, clip_seed: int) -> torch.Tensor:
        return generate_latents(world, prompts[index].text, seed=clip_seed, steps=steps, cfg=cfg, progress=_quiet)

    return prior_clips(generate, prompts, world.text, settings, base_model, cache_dir, progress or _quiet)


def _quiet(done: int, total: int) -> None:
    """The world's sets take moments to make: no progress bars."""


def subject_set(world: World, case: Case, dino=None, preservation: int = 16, seed: int = 0,
                moving_clips: int = 0) -> SubjectSet:
    """The case's subject photos with masks under the prompt "sks", the DINOv2 patch tokens of each photo
    (with the world's encoder, if given), `preservation` clips of the base vocabulary, and `moving_clips` clips
    of each photo's subject sliding along a straight path at the world's speeds."""
    photos = case.subject_images()
    frames = torch.cat([p.frames for p in photos])
    masks = torch.cat([p.masks for p in photos])
    with torch.no_grad():
        context = world.text([SUBJECT_WORD])
    representation = None
    if dino is not None:
        from ..representations.subject import extract_subject

        representation = extract_subject(dino, frames, masks, resolution=case.spec.size, fit="stretch",
                                         progress=_quiet)
    spec = case.spec
    clips = vocabulary_clips(world.text, spec, preservation, seed + 4242) if preservation else None
    return datasets.subject_set(
        frames, encode, context, masks, representation, clips, subject_tokens=(0,),  # "sks" is the only word
        trigger_words=SUBJECT_WORD, moving_clips=moving_clips, moving_frames=spec.frames,
        travel=tuple(v * (spec.frames - 1) / spec.size for v in spec.speed),  # the world's speeds, per clip
        seed=seed, encode_still=encode_stills, progress=_quiet)


def motion_set(world: World, case: Case, raft=None, hue_copies: int = 0) -> VideoSet:
    """The case's motion clips captioned with their own subject plus "mtn" (MotionDirector's captions),
    their frames as stills, and their RAFT flow from the world's encoder, if given; with `hue_copies`, each
    clip is followed by that many copies in other colours (same caption, same flow)."""
    clips = case.motion_clips()
    with torch.no_grad():
        context = world.text([f"{c.prompt} {MOTION_WORD}" for c in clips])
    flow = None
    if raft is not None:
        from ..representations.motion import compute_flow

        flow = torch.stack([compute_flow(raft, c.frames, progress=_quiet) for c in clips])
    return datasets.clip_set(torch.stack([c.frames for c in clips]), encode, context, flow, stills=None,
                    hue_copies=hue_copies, encode_still=encode_stills, progress=_quiet)


def _training_bar(description: str):
    """A training loop's progress callback drawing a tqdm bar with the loss; the bar opens at the first
    step trained (a finished run that resumes draws none)."""
    from tqdm.auto import tqdm

    bar = None

    def progress(step: int, total: int, record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc=description, unit="step")
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        bar.update(step - bar.n)
        if step == total:
            bar.close()

    return progress


@dataclass
class LoraMethod:
    """A benchmark method: a subject LoRA and a motion LoRA trained on a case, generated together."""

    name: str
    subject: SubjectSettings | None  # None: the motion LoRA alone, prompted with `subject_words`
    motion: MotionSettings
    subject_words: str = "clip"  # without a subject LoRA, the prompt's subject: "clip" (the first motion clip's) or
    # "case" (the case's words: a subject the clips never showed, for motion transfer)
    schedules: dict[str, StrengthSchedule] | None = None  # None: both at 1.0 throughout
    joint: OptimSettings | None = None  # the two LoRAs trained together in alternating steps (DualReal)
    motion_probability: float = 0.5  # joint training: the chance that a step is a motion step
    hue_copies: int = 0  # copies of each motion clip in other colours (appearance debiasing)
    moving_clips: int = 0  # clips of each subject photo sliding along a straight path, learned with the photos
    sampling_steps: int = 30
    cfg: float = 4.0
    encoders: dict = field(default_factory=dict)  # "dino", "raft": loaded world encoders
    progress_bars: bool = False  # tqdm bars while training and sampling (the benchmark runs without)

    def __post_init__(self):
        if self.subject_words not in ("clip", "case"):
            raise InputError("subject_words", f"'{self.subject_words}'", "'clip' or 'case'")

    def subject_data(self, world: World, case: Case) -> SubjectSet:
        """The case's subject set as this method learns it (with the world's DINOv2 features if it aligns)."""
        from ..representations.subject import load_dinov2
        from .encoders import DINO_FILE

        dino = None
        if self.subject.alignment_weight > 0:  # the world's encoders load once per method, only if used
            dino = self.encoders.get("dino") or self.encoders.setdefault("dino", load_dinov2(DINO_FILE))
        return subject_set(world, case, dino, 16 if self.subject.preservation_weight else 0,
                           moving_clips=self.moving_clips)

    def prepare(self, world: World, case: Case, workdir: Path):
        from ..representations.motion import load_raft
        from .encoders import RAFT_FILE

        workdir = Path(workdir)
        if self.motion.alignment_weight > 0 and "raft" not in self.encoders:
            self.encoders["raft"] = load_raft(RAFT_FILE)
        raft = self.encoders.get("raft") if self.motion.alignment_weight > 0 else None
        decoded = None
        if self.motion.alignment == "decoded_flow" and raft is not None:
            decoded = DecodedFlow(decode, raft, DecodedFlow.grouped_frames(TEMPORAL_FACTOR))
        subject_data = None if self.subject is None else self.subject_data(world, case)
        motion_data = motion_set(world, case, raft, self.hue_copies)

        def bar(description: str):
            return _training_bar(description) if self.progress_bars else None

        if self.joint is not None:
            subject, motion = train_joint(world.backbone, subject_data, motion_data, self.subject, self.motion,
                                          self.joint, self.motion_probability, workdir=workdir / "joint",
                                          decoded_flow=decoded, progress=bar("subject and motion LoRAs"))
        else:
            subject = None if subject_data is None else train_subject(world.backbone, subject_data, self.subject,
                                                                      workdir / "subject", bar("subject LoRA"))
            motion = train_motion(world.backbone, motion_data, self.motion, workdir / "motion", bar("motion LoRA"),
                                  decoded_flow=decoded)
        trained_loras = [t for t in (subject, motion) if t is not None]
        for trained in trained_loras:
            save_lora(workdir / f"{case.name}_{trained.spec.name}.safetensors", trained.tensors, trained.spec,
                      world.backbone, {"case": case.name, "method": self.name, "steps": len(trained.history),
                                       "trigger": SUBJECT_WORD if trained is subject else MOTION_WORD})
            learned = trained.learned_trigger()  # learned at the subject set's trigger words, SUBJECT_WORD
            if learned is not None:
                save_trigger_embedding(workdir / f"{case.name}_{trained.spec.name}_trigger_embedding.safetensors",
                                       learned)
        # The schedules of the LoRAs trained (the motion-only methods have no subject LoRA to time).
        schedules = {t.spec.name: self.schedules[t.spec.name] for t in trained_loras
                     if t.spec.name in (self.schedules or {})} or None

        def run(prompts, seed):
            return generate_with_loras(world, trained_loras, prompts, seed, schedules,
                                       progress_bar=self.progress_bars, steps=self.sampling_steps, cfg=self.cfg)

        if subject is not None:
            subject_words = SUBJECT_WORD
        else:
            subject_words = case.subject.get("words", "") if self.subject_words == "case" else case.motion_clips()[0].prompt
        return run, {"subject": subject_words, "motion": MOTION_WORD}


def generate_with_loras(world: World, loras: list[TrainedParts], prompts: list[str], seed: int,
                        schedules: dict[str, StrengthSchedule] | None = None, progress_bar: bool = False,
                        text_edit: Callable[[torch.Tensor], torch.Tensor] | None = None, merge: bool = True,
                        **sampling) -> torch.Tensor:
    """Generate with trained LoRAs attached (and a subject LoRA's trigger embedding at "sks"); merged into the
    weights when no strength changes and `merge` is on, unmerged otherwise (with per-step strengths if they change).
    `text_edit`: a change to the text context where it enters the model (`WanBackbone.edit_text_context`). The world
    model is unchanged afterwards (to the rounding of a merge and unmerge). `progress_bar`: a tqdm bar over the
    sampling steps."""
    progress = None if progress_bar else lambda *_: None  # generate draws a bar when given no callback
    with LoraAdapters(world.backbone, [t.spec for t in loras]) as adapters, contextlib.ExitStack() as edits:
        for t in loras:
            adapters.load_native_state_dict(t.spec.name, t.tensors)
            if t.trigger_embedding is not None:
                edits.enter_context(world.text.word_residual(SUBJECT_WORD, t.trigger_embedding))
        if text_edit is not None:
            edits.enter_context(world.backbone.edit_text_context(text_edit))
        if schedules and not all(s.is_constant for s in schedules.values()):
            return generate(world, prompts, seed=seed, progress=progress,
                            controls=[ScheduledStrengths(adapters, schedules), *sampling.pop("controls", ())],
                            **sampling)
        for name, schedule in (schedules or {}).items():
            adapters.set_strength(name, schedule.at(0.0))
        with adapters.merged() if merge else contextlib.nullcontext():
            return generate(world, prompts, seed=seed, progress=progress, **sampling)
