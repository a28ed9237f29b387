"""SynMotion's recipe: the dual embeddings and the motion LoRA, with embedding-specific training on prior clips.

Parts: the dual embeddings (`adapters.synmotion.SynMotionEmbeddingPart`, groups `<name>_subject` and
`<name>_motion`) and the motion LoRA on q, k, v of every attention layer (`adapters.lora.synmotion_motion_lora`,
named `<name>_lora`). Tasks: `motion` (one of the user's clips with its own prompt, which holds the subject's and
the motion's words: both embeddings and the LoRA learn) with probability `motion_probability` (the paper's 0.75),
else `prior` (one of the subject prior clips with its own prompt: the part's positions are set to that prompt's
subject words, no motion rows, and only `<name>_subject` learns). Both regress Wan's velocity with plain MSE, as the
pack's motion recipes (what SynMotion's notes describe names no other loss; HunyuanVideo, its backbone, is trained
by flow matching too). The LoRA runs in the prior steps too, frozen there: the subject
embedding learns beside the motion adapters it will be used with, as DualReal's frozen adapter runs.

The caller finds the words' positions with its text encoder's tokenizer (this module has none): `positions`, one
`RolePositions` per clip (or one for all), and `prior_subjects`, the subject words' positions in each prior clip's
prompt (`prior_subject_positions` maps a finder over the clips' prompts). Precomputed, they are part of the data a
checkpoint is matched by.

Defaults: the paper's 2000 steps at lr 2e-5 train HunyuanVideo's full-size embeddings and adapters. On Wan the pack's
LoRAs learn at 1e-4 (SMRABooth's rate for Wan, Train Motion LoRA's), and the embeddings' zero-initialised
projections make their step size the rate's, not the encoder's scale; at five times the paper's rate, 1000 steps
(750 of them on the clips, 2.5 times Train Motion LoRA's 300) is what this recipe takes. The world's methods set
their own (`world/bench/methods.toml`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..adapters.lora import LoraPart, synmotion_motion_lora
from ..adapters.synmotion import RolePositions, SynMotionEmbeddingPart
from ..backbones.memory import MemorySettings
from ..backbones.wan import WanBackbone
from ..errors import InputError
from .datasets import VideoSet, single_size
from .engine import PreviewParts, TrainedParts, run
from .loop import OptimSettings, Progress
from .objectives import SigmaSampler, add_noise, region_loss
from .prior_clips import PriorClips, PriorPrompt
from .tasks import Random, Recipe, Schedule, StepContext, Task


def _wan_optim() -> OptimSettings:
    return OptimSettings(steps=1000, lr=1e-4)


@dataclass
class SynMotionSettings:
    rank: int = 64  # the motion LoRA's (synmotion_motion_lora)
    motion_probability: float = 0.75  # of the steps, the share on the user's clips (the rest on prior clips)
    prior: bool = True  # off: no prior clips, every step a motion step (an ablation)
    refiner: bool = True  # off: the residuals alone (an ablation)
    alternation: bool = True  # off: prior steps update everything, not the subject embedding alone (an ablation)
    sigmas: SigmaSampler = field(default_factory=SigmaSampler)
    optim: OptimSettings = field(default_factory=_wan_optim)
    gradient_checkpointing: bool = False
    memory: MemorySettings = MemorySettings()  # more memory savings: every k-th block, offloading, block swap
    name: str = "synmotion"


def prior_subject_positions(prior: PriorClips, find: Callable[[PriorPrompt], Sequence[int]]) -> list[tuple[int, ...]]:
    """The subject words' positions in each prior clip's prompt, `find` (the caller's tokenizer) called once per
    distinct prompt."""
    found: dict[PriorPrompt, tuple[int, ...]] = {}
    for p in prior.prompts:
        if p not in found:
            found[p] = tuple(find(p))
    return [found[p] for p in prior.prompts]


def _clip_positions(positions: RolePositions | Sequence[RolePositions], clips: VideoSet) -> list[RolePositions]:
    n = clips.latents.shape[0]
    each = [positions] * n if isinstance(positions, RolePositions) else list(positions)
    if len(each) != n:
        raise InputError("positions", f"{len(each)} for {n} clips", "one RolePositions per clip, or one for all")
    if any(not p.motion for p in each):
        first = next(i for i, p in enumerate(each) if not p.motion)
        raise InputError("motion_words", f"no motion token found in the prompt of clip {first}",
                         "motion words that appear in every clip's prompt")
    counts = {len(p.motion) for p in each}
    if len(counts) > 1:
        raise InputError("motion_words", f"the motion words tokenize to {sorted(counts)} tokens in the clips' prompts",
                         "the same motion words, as many tokens, in every clip's prompt")
    return each


def _check_prior(prior: PriorClips, prior_subjects: Sequence[Sequence[int]] | None, clips: VideoSet,
                 prior_model: str | None) -> list[tuple[int, ...]]:
    if prior_model is None:
        raise InputError("prior_clips", "no fingerprint of the model being trained to check them against",
                         "prior_model: the fingerprint the clips' generator kept (e.g. world_fingerprint)")
    prior.require_model(prior_model, "prior_clips")
    if prior.latents.shape[1:] != clips.latents.shape[1:] or prior.context.shape[2] != clips.context.shape[2]:
        raise InputError("prior_clips", f"clips of latents {tuple(prior.latents.shape[1:])} and text width "
                         f"{prior.context.shape[2]}", f"clips of latents {tuple(clips.latents.shape[1:])} and text width "
                         f"{clips.context.shape[2]}, as the motion clips (generated at their size)")
    n = prior.latents.shape[0]
    if prior_subjects is None or len(prior_subjects) != n:
        raise InputError("prior_clips", f"{'no' if prior_subjects is None else len(prior_subjects)} subject positions "
                         f"for {n} prior clips", "the subject words' positions in each prior clip's prompt")
    subjects = [tuple(s) for s in prior_subjects]
    missing = [prior.prompts[i].text if i < len(prior.prompts) else str(i) for i, s in enumerate(subjects) if not s]
    if missing:
        raise InputError("prior_clips", f"no subject words found in the prompt '{missing[0]}'",
                         "prior clips whose prompts name their subject")
    return subjects


def synmotion_recipe(backbone: WanBackbone, clips: VideoSet, positions: RolePositions | Sequence[RolePositions],
                     motion_phrase: torch.Tensor, prior: PriorClips | None, settings: SynMotionSettings,
                     prior_subjects: Sequence[Sequence[int]] | None = None, prior_model: str | None = None,
                     subject_words: str = "", motion_words: str = "") -> Recipe:
    """SynMotion's parts, tasks and schedule on `clips` (their prompts' word positions: `positions`) and, unless
    `settings.prior` is off, `prior` (its clips' subject positions: `prior_subjects`; `prior_model`: the fingerprint of
    the model being trained as the clips were generated by, e.g. `world.customize.world_fingerprint`, refused if
    another). `motion_phrase`: the motion words' conditioning alone (the motion residual starts from its mean)."""
    backbone.require_text_to_video("SynMotion")
    if not 0.0 < settings.motion_probability < 1.0:
        raise InputError("motion_probability", f"{settings.motion_probability}", "a probability strictly between 0 and 1")
    clips = single_size(clips, "clips")
    each = _clip_positions(positions, clips)
    if settings.prior and prior is None:
        raise InputError("prior_clips", "none were given", "subject prior clips of this model (or the prior turned off)")
    subjects = _check_prior(prior, prior_subjects, clips, prior_model) if settings.prior else []
    seed, name = settings.optim.seed, settings.name
    embeddings = SynMotionEmbeddingPart(name, each[0], clips.context.shape[-1], motion_phrase, subject_words,
                                        motion_words, settings.refiner, seed)
    lora = LoraPart(synmotion_motion_lora(settings.rank, f"{name}_lora"), seed)
    everything = (f"{name}_subject", f"{name}_motion", lora.name)

    def loss_on(latents: torch.Tensor, context: torch.Tensor, positions_of: Callable[[int], RolePositions], term: str):
        def loss(g: torch.Generator, ctx: StepContext):
            i = int(torch.randint(latents.shape[0], (1,), generator=g))  # one clip: its prompt's positions
            embeddings.set_positions(positions_of(i))
            x0 = latents[i:i + 1].to(ctx.device, ctx.dtype)
            sigma = settings.sigmas(1, g)
            x, target = add_noise(x0, sigma, g)
            rows = context[i:i + 1] if context.shape[0] > 1 else context  # one row may stand for every clip
            v = ctx.backbone.forward(x, sigma.to(ctx.device), rows.to(ctx.device, ctx.dtype))
            l_mse = region_loss(v, target)
            return l_mse, {term: float(l_mse.detach())}

        return loss

    schedule: Schedule = Task("motion", loss_on(clips.latents, clips.context, each.__getitem__, "motion"), everything)
    if settings.prior:
        trains = (f"{name}_subject",) if settings.alternation else everything
        learn_prior = Task("prior", loss_on(prior.latents, prior.context, lambda i: RolePositions(subject=subjects[i]),
                                            "prior"), trains)
        schedule = Random([(settings.motion_probability, schedule), (1 - settings.motion_probability, learn_prior)])
    data = (clips, each, motion_phrase, prior if settings.prior else None, subjects)
    return Recipe(name, [embeddings, lora], schedule, returns=(name, lora.name), settings=settings, data=data,
                  main=lora.name)


def train_synmotion(backbone: WanBackbone, clips: VideoSet, positions: RolePositions | Sequence[RolePositions],
                    motion_phrase: torch.Tensor, prior: PriorClips | None,
                    settings: SynMotionSettings = SynMotionSettings(), prior_subjects: Sequence[Sequence[int]] | None = None,
                    prior_model: str | None = None, subject_words: str = "", motion_words: str = "",
                    workdir: str | Path | None = None, progress: Progress | None = None,
                    log: Callable[[str], None] | None = None, device: torch.device | None = None,
                    dtype: torch.dtype | None = None, base_model: str | None = None,
                    preview: PreviewParts | None = None) -> TrainedParts:
    """Train SynMotion's embeddings and motion LoRA (`synmotion_recipe`); the parts are `<name>` (the embeddings:
    `LearnedSynMotion.from_exported`) and `<name>_lora` (the main LoRA: `spec`, `tensors`). `device`, `dtype`,
    `base_model`, `preview`: as `train_subject`."""
    recipe = synmotion_recipe(backbone, clips, positions, motion_phrase, prior, settings, prior_subjects, prior_model,
                              subject_words, motion_words)
    return run(backbone, [recipe], recipe.schedule, settings.optim, settings.gradient_checkpointing, workdir,
               progress, log, device, dtype, base_model, memory=settings.memory, preview=preview)[0]
