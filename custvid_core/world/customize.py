"""Customization on the shapes world: a case's subject photos and motion clips as cached training
sets, and the LoRA methods the benchmark compares (plain LoRA up to the full SMRABooth recipe).

The subject is learned under the placeholder word `sks`, the motion under `mtn`; a case's prompts
are then generated as "sks mtn" with both LoRAs attached.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..adapters.embedding import save_trigger_embedding
from ..adapters.lora import LoraAdapters, save_lora
from ..backbones.wan import ROLES
from ..control.strength import SMRABOOTH_TIMING, ScheduledStrengths, StrengthSchedule
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
from ..training.loop import OptimSettings, warmup_steps
from ..training.objectives import DecodedFlow, SigmaSampler
from .cases import Case
from .latent import TEMPORAL_FACTOR, decode, encode, encode_stills
from .model import World
from .sample import generate
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


def _world_optim(steps: int, lr: float) -> OptimSettings:
    return OptimSettings(steps=steps, lr=lr, warmup=warmup_steps(steps), checkpoint_every=max(1, steps))


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
    subject: SubjectSettings | None  # None: the motion LoRA alone, prompted with a motion clip's own subject
    motion: MotionSettings
    schedules: dict[str, StrengthSchedule] | None = None  # None: both at 1.0 throughout
    joint: OptimSettings | None = None  # the two LoRAs trained together in alternating steps (DualReal)
    motion_probability: float = 0.5  # joint training: the chance that a step is a motion step
    hue_copies: int = 0  # copies of each motion clip in other colours (appearance debiasing)
    moving_clips: int = 0  # clips of each subject photo sliding along a straight path, learned with the photos
    sampling_steps: int = 30
    cfg: float = 4.0
    encoders: dict = field(default_factory=dict)  # "dino", "raft": loaded world encoders
    progress_bars: bool = False  # tqdm bars while training and sampling (the benchmark runs without)

    def prepare(self, world: World, case: Case, workdir: Path):
        from ..representations.motion import load_raft
        from ..representations.subject import load_dinov2
        from .encoders import DINO_FILE, RAFT_FILE

        workdir = Path(workdir)
        # The world's encoders load once per method, only for the rungs that align with them.
        align_subject = self.subject is not None and self.subject.alignment_weight > 0
        if align_subject and "dino" not in self.encoders:
            self.encoders["dino"] = load_dinov2(DINO_FILE)
        if self.motion.alignment_weight > 0 and "raft" not in self.encoders:
            self.encoders["raft"] = load_raft(RAFT_FILE)
        dino = self.encoders.get("dino") if align_subject else None
        raft = self.encoders.get("raft") if self.motion.alignment_weight > 0 else None
        decoded = None
        if self.motion.alignment == "decoded_flow" and raft is not None:
            decoded = DecodedFlow(decode, raft, DecodedFlow.grouped_frames(TEMPORAL_FACTOR))
        subject_data = None
        if self.subject is not None:
            subject_data = subject_set(world, case, dino, 16 if self.subject.preservation_weight else 0,
                                       moving_clips=self.moving_clips)
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

        def run(prompts, seed):
            return generate_with_loras(world, trained_loras, prompts, seed, self.schedules,
                                       progress_bar=self.progress_bars, steps=self.sampling_steps, cfg=self.cfg)

        subject_words = SUBJECT_WORD if subject is not None else case.motion_clips()[0].prompt
        return run, {"subject": subject_words, "motion": MOTION_WORD}


def generate_with_loras(world: World, loras: list[TrainedParts], prompts: list[str], seed: int,
                        schedules: dict[str, StrengthSchedule] | None = None, progress_bar: bool = False,
                        **sampling) -> torch.Tensor:
    """Generate with trained LoRAs attached (and a subject LoRA's trigger embedding at "sks"); merged into the
    weights when no strength changes, unmerged with per-step strengths otherwise. The world model is unchanged
    afterwards. `progress_bar`: a tqdm bar over the sampling steps."""
    progress = None if progress_bar else lambda *_: None  # generate draws a bar when given no callback
    with LoraAdapters(world.backbone, [t.spec for t in loras]) as adapters, contextlib.ExitStack() as embeddings:
        for t in loras:
            adapters.load_native_state_dict(t.spec.name, t.tensors)
            if t.trigger_embedding is not None:
                embeddings.enter_context(world.text.word_residual(SUBJECT_WORD, t.trigger_embedding))
        if schedules and not all(s.is_constant for s in schedules.values()):
            return generate(world, prompts, seed=seed, progress=progress,
                            controls=[ScheduledStrengths(adapters, schedules), *sampling.pop("controls", ())],
                            **sampling)
        for name, schedule in (schedules or {}).items():
            adapters.set_strength(name, schedule.at(0.0))
        with adapters.merged():
            return generate(world, prompts, seed=seed, progress=progress, **sampling)


def lora_methods(steps: int = 300, lr: float = 1e-3, alignment_block: int = 1) -> dict[str, LoraMethod]:
    """The ablation ladder of the benchmark: each rung adds one thing to the one before."""
    # The noise levels the shipped world was pretrained on (uniform through the sampler's shift-3 schedule):
    # the layout and the path are decided at the highest ones, which logit-normal rarely visits.
    sigmas = SigmaSampler("uniform", shift=3.0)
    optim = _world_optim(steps, lr)
    plain_subject = SubjectSettings(rank=32, optim=optim, sigmas=sigmas, region_loss=False, preservation_weight=0.0,
                                    alignment_weight=0.0, alignment_block=alignment_block,
                                    token_attention_weight=0.0)
    plain_motion = MotionSettings(rank=64, spatial_rank=0, optim=optim, sigmas=sigmas, debiased_weight=0.0,
                                  alignment_weight=0.0, alignment_block=alignment_block)
    losses_subject = replace(plain_subject, region_loss=True, preservation_weight=1.0, token_attention_weight=0.01)
    losses_motion = replace(plain_motion, spatial_rank=32, debiased_weight=1.0)
    sura_subject = replace(losses_subject, alignment_weight=0.05)
    mora_motion = replace(losses_motion, alignment_weight=1.0)
    mora_decoded_motion = replace(mora_motion, alignment="decoded_flow")
    # + a throw-away stillness LoRA under the subject LoRA (the world shows photos as still clips), with half as
    # many steps again so the photos and the preservation clips get as many steps as before.
    still_subject = replace(sura_subject, stillness_rank=32, optim=_world_optim(steps * 3 // 2, lr))
    embedding_subject = replace(still_subject, trigger_embedding=True, region_margin=3,
                                optim=_world_optim(steps * 9 // 2, lr))
    unrestricted_subject = replace(still_subject, roles=ROLES, region_loss=False, preservation_weight=0.0,
                                   alignment_weight=0.0, token_attention_weight=0.0, stillness_rank=0,
                                   trigger_embedding=True, optim=replace(still_subject.optim, steps=steps * 9 // 2))
    return {
        "plain_lora": LoraMethod("plain_lora", plain_subject, plain_motion),
        "losses": LoraMethod("losses", losses_subject, losses_motion),
        "sura": LoraMethod("sura", sura_subject, losses_motion),
        "mora": LoraMethod("mora", sura_subject, mora_motion),
        "full": LoraMethod("full", sura_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING)),
        "full_still": LoraMethod("full_still", still_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING)),
        # + each motion clip also in three other colours, so the motion LoRA cannot learn the clips' colours.
        "full_still_hue": LoraMethod("full_still_hue", still_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING),
                                     hue_copies=3),
        # Not in the default ladder: full_still_hue + a trigger embedding learned with the subject LoRA (SynMotion),
        # the region loss widened by 3 px so it sees the outline, and three times the subject steps.
        "full_embedding": LoraMethod("full_embedding", embedding_subject, mora_motion,
                                     schedules=dict(SMRABOOTH_TIMING), hue_copies=3),
        # Not in the default ladder: full_embedding with the subject LoRA on all ten roles.
        "full_embedding_all_roles": LoraMethod("full_embedding_all_roles", replace(embedding_subject, roles=ROLES),
                                               mora_motion, schedules=dict(SMRABOOTH_TIMING), hue_copies=3),
        # Not in the default ladder: the full method's motion LoRA with an unrestricted subject LoRA (all roles,
        # the plain loss over the whole photo, no preservation, alignment, token attention or stillness LoRA,
        # 3x the steps) and a trigger embedding: what draws an unseen shape best on its own.
        "unrestricted_subject_embedding": LoraMethod("unrestricted_subject_embedding", unrestricted_subject,
                                                     mora_motion, schedules=dict(SMRABOOTH_TIMING), hue_copies=3),
        # Not in the default ladder: unrestricted_subject_embedding with the subject also learned from its photos
        # made into moving clips (the subject sliding over its own background), on half of the photo steps.
        "moving_subject_embedding": LoraMethod("moving_subject_embedding", unrestricted_subject, mora_motion,
                                               schedules=dict(SMRABOOTH_TIMING), hue_copies=3, moving_clips=4),
        # Not in the default ladder: full_embedding_all_roles with moving clips instead of the stillness LoRA.
        "full_moving": LoraMethod("full_moving", replace(embedding_subject, roles=ROLES, stillness_rank=0), mora_motion,
                                  schedules=dict(SMRABOOTH_TIMING), hue_copies=3, moving_clips=4),
        # Not in the default ladder: full_moving with the subject LoRA on SMRABooth's roles (q, k, ffn.0) only.
        "full_moving_smrabooth_roles": LoraMethod("full_moving_smrabooth_roles",
                                                  replace(embedding_subject, stillness_rank=0), mora_motion,
                                                  schedules=dict(SMRABOOTH_TIMING), hue_copies=3, moving_clips=4),
        # Not in the default ladder: the plain motion LoRA without a subject LoRA, prompted with the first
        # motion clip's subject ("green square mtn"): what the motion LoRA has learned on its own.
        "motion_lora_only": LoraMethod("motion_lora_only", None, plain_motion),
        # Not in the default ladder: MoRA through the decoder and RAFT, as the authors' code runs it.
        "full_decoded_mora": LoraMethod("full_decoded_mora", sura_subject, mora_decoded_motion,
                                        schedules=dict(SMRABOOTH_TIMING)),
        # Not in the default ladder: the full rung's two LoRAs trained together, a subject or a motion step at
        # random (DualReal's dual-aware adaptation), as many steps in all as the two separate runs.
        "joint": LoraMethod("joint", sura_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING),
                            joint=_world_optim(2 * steps, lr)),
        # Not in the default ladder: joint training with the stillness LoRA under the subject LoRA; 2.5x the steps,
        # a motion step with probability 0.4, so each kind of step gets about as many as in the separate runs.
        "joint_still": LoraMethod("joint_still", still_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING),
                                  joint=_world_optim(5 * steps // 2, lr), motion_probability=0.4),
        # Not in the default ladder: joint_still with the motion clips also in three other colours.
        "joint_still_hue": LoraMethod("joint_still_hue", still_subject, mora_motion, schedules=dict(SMRABOOTH_TIMING),
                                      joint=_world_optim(5 * steps // 2, lr), motion_probability=0.4, hue_copies=3),
    }
