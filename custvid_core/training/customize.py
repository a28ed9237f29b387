"""The subject and motion recipes (SMRABooth, with MotionBooth's subject losses), as parts and tasks.

Both recipes take cached data (latents, text conditioning, DINOv2 tokens, RAFT flow computed once
per data set) and any Wan backbone (ComfyUI's native model, diffusers', the shapes world). Each is a
`tasks.Recipe`: the parts it attaches (LoRAs on the backbone's roles, an alignment projector, a trigger
embedding), its tasks (each a loss, the groups it trains and the parts it switches off) and a phase schedule
of them; `engine.run` trains them and returns their kept parts (`TrainedParts`). The backbone is left exactly
as it was.

Subject (`train_subject`): images as one-frame videos, prompt with a placeholder ("sks").
  Photos task: region loss (masked v-MSE) + alignment_weight * SuRA (projector on a block's hidden
  states vs the image's DINOv2 patch tokens) + token_attention_weight * STCA (the trigger word's
  cross-attention vs the mask); on a `moving_share` of the photo steps, the moving-clips task learns the
  photos' subject sliding over its background instead (the same losses without SuRA). Preservation task
  (any captioned clips, plain v-MSE * preservation_weight), in turn with the photos as MotionBooth does. Where
  photos can only be shown as still clips (the shapes world), a throw-away stillness LoRA learns stills of the
  preservation clips (its own task, the subject LoRA off) and runs frozen under the subject LoRA
  (Still-Moving), so the subject LoRA does not learn to stand still. Optionally a trigger embedding
  (SynMotion's subject embedding) learns with the LoRA on the photos.
  Schedule: Cycle(stillness, photos, preservation), or Cycle(photos, preservation), or the photos alone.
Motion (`train_motion`): MotionDirector's two phases in turn (Cycle(spatial, motion)): a spatial LoRA
  learns the clips' appearance from single frames; the motion LoRA learns the clips with the
  spatial LoRA active but frozen, with the appearance-debiased loss and MoRA (a projector reads
  the RAFT flow of each token's place off a block's hidden states; or, as the authors' code does, RAFT's
  flow of the decoded clean-latent prediction against the reference flow). The spatial LoRA is thrown away.
Joint (`joint_recipes`, `train_joint`): both recipes in one run, Random(motion, subject) each step, each recipe's
  schedule following the run's step index; each LoRA learns with the other attached and frozen (DualReal's
  dual-aware adaptation), each recipe's helpers and trigger embedding off during the other's steps. Optionally
  (`JointController`) DualReal's StageBlender controller weighs the two LoRAs per denoising step and per group of
  blocks, from each forward's tokens and timestep: the subject LoRA's output times 2w, the motion LoRA's times
  2 - 2w (both 1.0 at initialisation), learning on every step; it is a recipe of its own in the run.
  `joint_dualreal` keeps the pair and the controller as a DualReal (`save_dualreal`, `dualreal_parts`).
Image-to-video (Wan 2.1 / 2.2 I2V): every forward of the three also takes its items' start images (a clip's first
  frame, a single frame or photo itself) and CLIP features as the model generates with them (`ImageCondition`);
  data encoded without them is refused. A text-to-video model ignores them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..adapters.dualreal import ROLES as DUALREAL_ROLES
from ..adapters.dualreal import DualRealWeights
from ..adapters.embedding import TriggerEmbeddingPart
from ..adapters.lora import MOTION_ROLES, SUBJECT_ROLES, LoraPart, LoraSpec, base_model_signature
from ..adapters.parts import Exported, ProjectorPart
from ..adapters.stage_blender import LORA_WEIGHTING, StageBlenderPart, group_count
from ..backbones.memory import MemorySettings
from ..backbones.wan import ImageCondition, WanBackbone
from ..errors import InputError
from .datasets import AnyClips, AnyPhotos, buckets_of, draw_bucket
from .distributed import own_rows
from .engine import PreviewParts, TrainedParts, run
from .loop import OptimSettings, Progress
from .objectives import (
    DecodedFlow,
    SigmaSampler,
    add_noise,
    appearance_debiased,
    decoded_flow_loss,
    flow_on_token_grid,
    motion_alignment_loss,
    region_loss,
    subject_alignment_loss,
    subject_token_attention,
    token_attention_loss,
    widened,
)
from .tasks import Cycle, Random, Recipe, Schedule, StepContext, Task, each_task


@dataclass
class SubjectSettings:
    rank: int = 32
    roles: tuple[str, ...] = SUBJECT_ROLES
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(steps=300, lr=1e-4))
    batch: int = 1
    sigmas: SigmaSampler = field(default_factory=SigmaSampler)
    region_loss: bool = True  # masked loss (needs masks); off: plain MSE over the image
    # Latent cells added around the mask for the region loss, so it also sees the subject's outline against the
    # background. On Wan a latent cell covers 8x8 pixels and the mask already reaches past the outline; a
    # latent as fine as the pixels (the shapes world's) leaves a concave outline (a star's) unlearned without it.
    region_margin: int = 0
    preservation_weight: float = 1.0  # 0 or no clips: no preservation batches
    alignment_weight: float = 0.05  # SuRA; 0 or no DINOv2 tokens: off
    alignment_block: int = 3
    projector_hidden: int = 0  # 0: REPA's 2048 (4x the width on models under 512 wide)
    token_attention_weight: float = 0.01  # MotionBooth's STCA; needs masks and subject_tokens
    token_attention_blocks: tuple[int, ...] | None = None  # None: every block
    # Still-Moving's stillness LoRA: where photos can only be shown to the model as still clips, a throw-away
    # LoRA learns "everything stands still" from stills of the preservation clips and runs, frozen, while the
    # subject LoRA learns, so the subject LoRA learns the subject's look and not its stillness. 0: off.
    stillness_rank: int = 0
    stillness_roles: tuple[str, ...] = MOTION_ROLES
    # SynMotion's subject embedding: a learnable residual on the trigger word's conditioning rows, trained with
    # the LoRA on the photos (needs subject_tokens). Returned as a part (`TrainedParts.trigger_embedding`).
    trigger_embedding: bool = False
    moving_share: float = 0.5  # of the photo steps, the share on the moving clips (if the data set has them)
    gradient_checkpointing: bool = False
    memory: MemorySettings = MemorySettings()  # more memory savings: every k-th block, offloading, block swap
    name: str = "subject"


MOTION_ALIGNMENT = ("features", "decoded_flow")


@dataclass
class MotionSettings:
    rank: int = 64
    roles: tuple[str, ...] = MOTION_ROLES
    spatial_rank: int = 32  # 0: no spatial phase
    spatial_roles: tuple[str, ...] = SUBJECT_ROLES
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(steps=300, lr=1e-4))
    batch: int = 1
    sigmas: SigmaSampler = field(default_factory=SigmaSampler)
    debiased_weight: float = 1.0  # appearance-debiased loss
    alignment_weight: float = 1.0  # MoRA; 0 or no flow: off
    alignment: str = "features"  # MOTION_ALIGNMENT: feature level (cheap) or the decoded prediction's flow
    alignment_block: int = 3
    projector_hidden: int = 0  # 0: REPA's 2048 (4x the width on models under 512 wide)
    gradient_checkpointing: bool = False
    memory: MemorySettings = MemorySettings()  # more memory savings: every k-th block, offloading, block swap
    name: str = "motion"


def _pick(n: int, batch: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (batch,), generator=g)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[idx] if x.shape[0] > 1 else x.expand(len(idx), *x.shape[1:])


def _with_start_images(backbone: WanBackbone, items, input_name: str) -> bool:
    """Whether a recipe passes `items`' start images to the model (it is image-to-video); items (a set or a
    `Bucketed` one, every bucket) encoded without them (or without the CLIP features the model takes) are refused
    naming `input_name`. A text-to-video model ignores start images."""
    if not backbone.condition_channels:
        return False
    if any(s.start is None for s in buckets_of(items)):
        raise InputError(input_name, "encoded without start images, and this is an image-to-video Wan",
                         "data encoded with image_to_video on (each item's first frame as its start image), or a "
                         "text-to-video model")
    if backbone.takes_clip_features and any(s.clip_features is None for s in buckets_of(items)):
        raise InputError(input_name, "encoded without CLIP vision features, which this Wan 2.1 image-to-video model "
                         "takes", "data encoded with clip_vision_output connected (CLIP Vision Encode of the start "
                         "images)")
    return True


def _start_images(items, idx: torch.Tensor, ctx: StepContext, start: torch.Tensor | None = None) -> ImageCondition:
    """Rows `idx` of `items`' image-to-video condition; `start`: the rows' start latents where not the items' own
    (a still's, which is its own start image)."""
    features = None if items.clip_features is None else _rows(items.clip_features, idx).to(ctx.device, ctx.dtype)
    return ImageCondition.start_frame(items.start[idx].to(ctx.device, ctx.dtype) if start is None else start, features)


def _check_block(block: int, backbone: WanBackbone, name: str) -> None:
    if not 0 <= block < backbone.num_blocks:
        raise InputError(name, f"block {block}", f"a block from 0 to {backbone.num_blocks - 1}")


def _projector(settings, backbone: WanBackbone, width: int, seed: int) -> ProjectorPart:
    return ProjectorPart(f"{settings.name}_alignment_projector", backbone.dim, width, settings.projector_hidden, seed)


def subject_recipe(backbone: WanBackbone, data: AnyPhotos, settings: SubjectSettings, seed: int) -> Recipe:
    """The subject recipe's parts, tasks and schedule; the parts' initial weights come from `seed`. A bucketed
    set's batches each come from one of its buckets (`datasets.draw_bucket`)."""
    photo_sets = buckets_of(data)
    first = photo_sets[0]  # what every bucket shares: which data it has, trigger words, preservation clips
    align = settings.alignment_weight > 0 and first.dino_tokens is not None
    preserve = settings.preservation_weight > 0 and first.preservation is not None
    if align:
        _check_block(settings.alignment_block, backbone, "alignment_block")
    attend = settings.token_attention_weight > 0 and bool(first.subject_tokens) and first.masks is not None
    attention_blocks = list(range(backbone.num_blocks) if settings.token_attention_blocks is None
                            else settings.token_attention_blocks)
    for b in attention_blocks if attend else ():
        _check_block(b, backbone, "token_attention_blocks")
    if settings.stillness_rank > 0 and (not preserve or buckets_of(first.preservation)[0].stills is None):
        raise InputError("stillness_rank", "a stillness LoRA learns from stills of the preservation clips, "
                         "and there are none", "preservation clips with their stills, or 0")
    if settings.region_margin < 0:
        raise InputError("region_margin", f"{settings.region_margin}", "0 or more latent cells")
    if not 0 <= settings.moving_share <= 1:
        raise InputError("moving_share", f"{settings.moving_share}", "a share from 0 to 1")
    if settings.trigger_embedding and not first.subject_tokens:
        raise InputError("trigger_embedding", "a trigger embedding is learned at the trigger word, and the "
                         "subject images have none", "trigger words in the subject's prompt, or off")
    image_to_video = _with_start_images(backbone, data, "subject")
    if image_to_video and first.moving is not None:
        for photos in photo_sets:
            _with_start_images(backbone, photos.moving, "subject")
    if image_to_video and preserve:
        _with_start_images(backbone, first.preservation, "preservation")
    main = LoraPart(LoraSpec(settings.name, tuple(settings.roles), settings.rank), seed)
    parts = [main]
    stillness = projector = embedding = None
    if settings.stillness_rank > 0:
        stillness = LoraPart(LoraSpec(f"{settings.name}_stillness", tuple(settings.stillness_roles),
                                      settings.stillness_rank), seed)
        parts.append(stillness)
    if align:
        projector = _projector(settings, backbone, first.dino_tokens.shape[1], seed)
        parts.append(projector)
    if settings.trigger_embedding:
        embedding = TriggerEmbeddingPart(f"{settings.name}_trigger_embedding", first.subject_tokens,
                                         first.context.shape[-1], first.trigger_words, seed)
        parts.append(embedding)
    learns_subject = tuple(p.name for p in (main, projector, embedding) if p is not None)
    # The trigger embedding edits the rows of the photos' prompt: off on clips with prompts of their own.
    photo_prompt_only = (embedding.name,) if embedding is not None else ()
    # The region loss's masks, widened once here rather than on every step; keyed by the bucket and whether a step
    # takes the moving clips.
    region_masks = {(k, moving): widened(d.masks, settings.region_margin) for k, photos in enumerate(photo_sets)
                    for moving, d in ((False, photos), (True, photos.moving)) if d is not None and d.masks is not None} \
        if settings.region_loss else {}

    def subject_loss(moving: bool):
        photo_align = align and not moving  # the photos' DINOv2 features, on photo steps only
        clip_attend = attend and (first.moving if moving else first).masks is not None

        def loss(g: torch.Generator, ctx: StepContext):
            bucket = draw_bucket(data, g)
            photos = photo_sets[bucket]
            items = photos.moving if moving else photos
            idx = _pick(items.latents.shape[0], settings.batch, g)
            x0 = items.latents[idx].to(ctx.device, ctx.dtype)
            sigma = settings.sigmas(len(idx), g)
            x, target = add_noise(x0, sigma, g)
            masks = region_masks.get((bucket, moving))
            batch_mask = masks[idx].to(ctx.device) if masks is not None else None
            idx, sigma, x, target = own_rows(idx, sigma, x, target)
            mask = masks[idx].to(ctx.device) if masks is not None else None
            context = _rows(items.context, idx).to(ctx.device, ctx.dtype)
            grid = ctx.backbone.token_grid(x.shape)
            with contextlib.ExitStack() as stack:
                hidden = stack.enter_context(ctx.backbone.capture(settings.alignment_block)) if photo_align else None
                attention = stack.enter_context(ctx.backbone.capture_cross_attention(attention_blocks)) \
                    if clip_attend else None
                v = ctx.backbone.forward(x, sigma.to(ctx.device), context,
                                         _start_images(items, idx, ctx) if image_to_video else None)
            l_region = region_loss(v, target, mask, batch_mask)
            total = l_region
            terms = {"region" if mask is not None else "mse": float(l_region.detach())}
            if photo_align:
                l_align = subject_alignment_loss(projector.module, hidden[settings.alignment_block], grid,
                                                 photos.dino_tokens[idx].to(ctx.device))
                total = total + settings.alignment_weight * l_align
                terms["alignment"] = float(l_align.detach())
            if clip_attend:
                maps = [subject_token_attention(a["q"], a["k"], a["heads"], list(first.subject_tokens))
                        for a in attention.values()]
                l_attend = token_attention_loss(maps, items.masks[idx].to(ctx.device), grid)
                total = total + settings.token_attention_weight * l_attend
                terms["token_attention"] = float(l_attend.detach())
            return total, terms

        return loss

    def clips_loss(still: bool):
        preservation = first.preservation

        def loss(g: torch.Generator, ctx: StepContext):
            clips = buckets_of(preservation)[draw_bucket(preservation, g)]
            idx = _pick(clips.latents.shape[0], settings.batch, g)
            if still:
                k = int(torch.randint(clips.stills.shape[1], (1,), generator=g))
                x0 = clips.stills[idx, k].to(ctx.device, ctx.dtype)
            else:
                x0 = clips.latents[idx].to(ctx.device, ctx.dtype)
            sigma = settings.sigmas(len(idx), g)
            x, target = add_noise(x0, sigma, g)
            idx, sigma, x0, x, target = own_rows(idx, sigma, x0, x, target)
            image = _start_images(clips, idx, ctx, x0 if still else None) if image_to_video else None
            v = ctx.backbone.forward(x, sigma.to(ctx.device), _rows(clips.context, idx).to(ctx.device, ctx.dtype), image)
            if still:
                loss = region_loss(v, target)
                return loss, {"stillness": float(loss.detach())}
            loss = settings.preservation_weight * region_loss(v, target)
            return loss, {"preservation": float(loss.detach())}

        return loss

    photos: Schedule = Task("photos", subject_loss(False), learns_subject)
    if first.moving is not None:
        moving = Task("moving_clips", subject_loss(True), learns_subject)
        photos = Random([(settings.moving_share, moving), (1 - settings.moving_share, photos)])
    schedule = photos
    if preserve:
        preservation = Task("preservation", clips_loss(False), (main.name,),
                            off=photo_prompt_only + ((stillness.name,) if stillness is not None else ()))
        schedule = Cycle([photos, preservation])
        if stillness is not None:
            # Stills of the preservation clips; the subject LoRA off, so that it does not learn them.
            still = Task("stillness", clips_loss(True), (stillness.name,), off=(main.name, *photo_prompt_only))
            schedule = Cycle([still, photos, preservation])
    own_only = tuple(p.name for p in (stillness, embedding) if p is not None)
    return Recipe(settings.name, parts, schedule, returns=(main.name, *photo_prompt_only), own_only=own_only,
                  settings=settings, data=data)


def motion_recipe(backbone: WanBackbone, data: AnyClips, settings: MotionSettings, seed: int,
                  decoded_flow: DecodedFlow | None = None) -> Recipe:
    """The motion recipe's parts, tasks and schedule; the parts' initial weights come from `seed`. A bucketed
    set's batches each come from one of its buckets (`datasets.draw_bucket`)."""
    if settings.alignment not in MOTION_ALIGNMENT:
        raise InputError("motion_alignment", f"'{settings.alignment}'", f"one of {', '.join(MOTION_ALIGNMENT)}")
    clip_sets = buckets_of(data)
    align = settings.alignment_weight > 0 and clip_sets[0].flow is not None
    decode_align = align and settings.alignment == "decoded_flow"
    if decode_align and decoded_flow is None:
        raise InputError("motion_alignment", "'decoded_flow' needs the VAE and a RAFT to decode and measure with",
                         "a VAE and a RAFT connected, or 'features'")
    if align and not decode_align:
        _check_block(settings.alignment_block, backbone, "alignment_block")
    frames = min(c.latents.shape[2] for c in clip_sets)
    if settings.spatial_rank > 0 and clip_sets[0].stills is None and frames < 2:
        raise InputError("motion clips", f"{frames} latent frame and no single frames",
                         "clips of at least 2 latent frames (5+ frames on Wan), or stills of their frames")
    image_to_video = _with_start_images(backbone, data, "clips")
    main = LoraPart(LoraSpec(settings.name, tuple(settings.roles), settings.rank), seed)
    parts = [main]
    spatial = projector = None
    if settings.spatial_rank > 0:
        spatial = LoraPart(LoraSpec(f"{settings.name}_spatial", tuple(settings.spatial_roles),
                                    settings.spatial_rank), seed)
        parts.append(spatial)
    if align and not decode_align:  # the feature-level MoRA projector reads the flow (2 values per token) off a block
        projector = _projector(settings, backbone, 2, seed)
        parts.append(projector)

    def spatial_loss(g: torch.Generator, ctx: StepContext):
        """Single frames as images (MotionDirector's spatial phase)."""
        clips = clip_sets[draw_bucket(data, g)]
        idx = _pick(clips.latents.shape[0], settings.batch, g)
        context = _rows(clips.context, idx).to(ctx.device, ctx.dtype)
        sigma = settings.sigmas(len(idx), g)
        if clips.stills is not None:
            k = int(torch.randint(clips.stills.shape[1], (1,), generator=g))
            x0 = clips.stills[idx, k].to(ctx.device, ctx.dtype)
        else:
            f = int(torch.randint(clips.latents.shape[2], (1,), generator=g))
            x0 = clips.latents[idx][:, :, f:f + 1].to(ctx.device, ctx.dtype)
        x, target = add_noise(x0, sigma, g)
        idx, x0, sigma, x, target, context = own_rows(idx, x0, sigma, x, target, context)
        image = _start_images(clips, idx, ctx, x0) if image_to_video else None  # a single frame is its own start image
        loss = region_loss(ctx.backbone.forward(x, sigma.to(ctx.device), context, image), target)
        return loss, {"spatial": float(loss.detach())}

    def motion_loss(g: torch.Generator, ctx: StepContext):
        backbone, device = ctx.backbone, ctx.device
        clips = clip_sets[draw_bucket(data, g)]
        frames = clips.latents.shape[2]
        idx = _pick(clips.latents.shape[0], settings.batch, g)
        context = _rows(clips.context, idx).to(device, ctx.dtype)
        sigma = settings.sigmas(len(idx), g)
        x0 = clips.latents[idx].to(device, ctx.dtype)
        x, target = add_noise(x0, sigma, g)
        idx, sigma, x, target, context = own_rows(idx, sigma, x, target, context)
        image = _start_images(clips, idx, ctx) if image_to_video else None
        if decode_align:
            v = backbone.forward(x, sigma.to(device), context, image)
            x0_pred = x - sigma.to(device, ctx.dtype).view(-1, 1, 1, 1, 1) * v  # x = s*noise + (1-s)*x0, v = noise-x0
            l_align = decoded_flow_loss(decoded_flow, x0_pred, clips.flow[idx].to(device), g)
        elif align:
            with backbone.capture(settings.alignment_block) as hidden:
                v = backbone.forward(x, sigma.to(device), context, image)
            grid = backbone.token_grid(x.shape)
            flow_tokens = flow_on_token_grid(clips.flow[idx].to(device), grid)
            l_align = motion_alignment_loss(projector.module, hidden[settings.alignment_block], grid, flow_tokens)
        else:
            v = backbone.forward(x, sigma.to(device), context, image)
            l_align = torch.zeros((), device=device)
        l_mse = region_loss(v, target)
        loss = l_mse + settings.alignment_weight * l_align
        terms = {"mse": float(l_mse.detach())}
        if settings.debiased_weight > 0 and frames > 1:  # one latent frame has no other frame to debias by
            ref = int(torch.randint(frames, (1,), generator=g))
            l_debiased = region_loss(appearance_debiased(v, ref), appearance_debiased(target, ref))
            loss = loss + settings.debiased_weight * l_debiased
            terms["debiased"] = float(l_debiased.detach())
        if align:
            terms["alignment"] = float(l_align.detach())
        return loss, terms

    learn = Task("motion", motion_loss, tuple(p.name for p in (main, projector) if p is not None))
    schedule: Schedule = learn
    if spatial is not None:  # the motion LoRA off, so that it does not absorb appearance
        schedule = Cycle([Task("spatial", spatial_loss, (spatial.name,), off=(main.name,)), learn])
    return Recipe(settings.name, parts, schedule, returns=(main.name,),
                  own_only=(spatial.name,) if spatial is not None else (), settings=settings, data=data)


def train_subject(backbone: WanBackbone, data: AnyPhotos, settings: SubjectSettings = SubjectSettings(),
                  workdir: str | Path | None = None, progress: Progress | None = None,
                  log: Callable[[str], None] | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, base_model: str | None = None,
                  preview: PreviewParts | None = None) -> TrainedParts:
    """`device`: where the forward runs (a partially loaded model's weights may sit elsewhere);
    default: the model's first parameter's device. `dtype`: the compute dtype (`engine.compute_dtype`), whatever
    the weights are stored in. `base_model`: the base model's signature for the checkpoint (a host that
    merged LoRAs into the weights gives its own); default: from its weights. `preview`: a clip sampled every
    `settings.optim.preview_every` steps (`engine.run`)."""
    recipe = subject_recipe(backbone, data, settings, settings.optim.seed)
    return run(backbone, [recipe], recipe.schedule, settings.optim, settings.gradient_checkpointing, workdir,
               progress, log, device, dtype, base_model, memory=settings.memory, preview=preview)[0]


def train_motion(backbone: WanBackbone, data: AnyClips, settings: MotionSettings = MotionSettings(),
                 workdir: str | Path | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, device: torch.device | None = None,
                 decoded_flow: DecodedFlow | None = None, dtype: torch.dtype | None = None,
                 base_model: str | None = None, preview: PreviewParts | None = None) -> TrainedParts:
    """`decoded_flow`: the decoder and RAFT for `alignment="decoded_flow"`; `device`, `dtype`, `base_model`,
    `preview`: as `train_subject`."""
    recipe = motion_recipe(backbone, data, settings, settings.optim.seed, decoded_flow)
    return run(backbone, [recipe], recipe.schedule, settings.optim, settings.gradient_checkpointing, workdir,
               progress, log, device, dtype, base_model, memory=settings.memory, preview=preview)[0]


@dataclass
class JointController:
    """DualReal's StageBlender controller over a joint run's subject and motion LoRAs (see the module's docstring).
    Without it each LoRA runs at 1.0 in every block and step, as a LoRA file loaded at strength 1.0 does; a LoRA
    saved from a run with it acts, loaded alone, as at the controller's starting weights (1.0), not as the trained
    controller weighs it."""

    groups: int | None = None  # groups of consecutive blocks weighed apart; None: 7 (or every block)
    name: str = "joint"


def _weighed_by(controller: StageBlenderPart, task: Task) -> Task:
    """`task`, also training the controller, its record holding the subject LoRA's weight per group of blocks
    (`subject_weight_<g>`, the batch's mean; the motion LoRA's is 2 minus it)."""
    def loss(g: torch.Generator, ctx: StepContext):
        total, terms = task.loss(g, ctx)
        weights = controller.identity_weights().mean(0)
        return total, {**terms, **{f"subject_weight_{i}": float(w) for i, w in enumerate(weights)}}

    return replace(task, loss=loss, trains=(*task.trains, controller.name))


def joint_recipes(backbone: WanBackbone, subject_data: AnyPhotos, motion_data: AnyClips, subject: SubjectSettings,
                  motion: MotionSettings, seed: int, motion_probability: float = 0.5,
                  controller: JointController | None = None,
                  decoded_flow: DecodedFlow | None = None) -> tuple[list[Recipe], Schedule]:
    """The joint run's recipes and schedule: the subject recipe, the motion recipe and, with `controller`, the
    controller's (its part `<name>_controller` learns on every step of the other two); each step is a motion step
    with probability `motion_probability`, else a subject step."""
    if not 0.0 < motion_probability < 1.0:
        raise InputError("motion_probability", f"{motion_probability}", "a probability strictly between 0 and 1")
    recipes = [subject_recipe(backbone, subject_data, subject, seed),
               motion_recipe(backbone, motion_data, motion, seed, decoded_flow)]
    weigher = None
    if controller is not None:
        group_count(controller.groups, backbone.num_blocks)  # refused here, before any data is moved
        subject_lora, motion_lora = (r.parts[0] for r in recipes)  # each recipe's main LoRA comes first
        weigher = StageBlenderPart(f"{controller.name}_controller", subject_lora, motion_lora, controller.groups,
                                   LORA_WEIGHTING, seed)
        recipes = [each_task(r, partial(_weighed_by, weigher)) for r in recipes]
    schedule = Random([(motion_probability, recipes[1].schedule), (1 - motion_probability, recipes[0].schedule)])
    if weigher is not None:
        recipes.append(Recipe(controller.name, [weigher], schedule, returns=(weigher.name,), settings=controller))
    return recipes, schedule


def joint_dualreal(trained: tuple[TrainedParts, ...], backbone: WanBackbone) -> DualRealWeights:
    """A joint run's (`train_joint`'s) LoRAs as a DualReal that Save DualReal writes and Apply DualReal applies: the
    subject LoRA as its identity part, the motion LoRA as its motion part (each with the base model it fits) and,
    where the run trained one, its controller."""
    base_model = base_model_signature(backbone)
    parts = {role: Exported(LoraPart.kind, run.tensors, {**run.parts[run.main].metadata, "base_model": base_model})
             for role, run in zip(DUALREAL_ROLES, trained[:2])}
    if len(trained) > 2:
        parts["controller"] = trained[2].parts[trained[2].main]
    return DualRealWeights(parts)


def train_joint(backbone: WanBackbone, subject_data: AnyPhotos, motion_data: AnyClips,
                subject: SubjectSettings = SubjectSettings(), motion: MotionSettings = MotionSettings(),
                optim: OptimSettings = OptimSettings(steps=600, lr=1e-4), motion_probability: float = 0.5,
                workdir: str | Path | None = None, progress: Progress | None = None,
                log: Callable[[str], None] | None = None, device: torch.device | None = None,
                decoded_flow: DecodedFlow | None = None, dtype: torch.dtype | None = None,
                base_model: str | None = None, controller: JointController | None = None,
                preview: PreviewParts | None = None) -> tuple[TrainedParts, ...]:
    """Subject and motion LoRAs trained together (DualReal's dual-aware adaptation): each step is a motion
    step with probability `motion_probability`, else a subject step; both LoRAs run in every forward pass
    and only the stepping one learns, so each learns in the presence of the other it will be used with.
    `optim` replaces the two settings' own (one optimiser, one schedule, one seed, one checkpoint). Returns the
    subject's and the motion's `TrainedParts`, and with `controller` the controller's third (its one part,
    `<name>_controller`, a StageBlender controller with `weighting="loras"`)."""
    recipes, schedule = joint_recipes(backbone, subject_data, motion_data, subject, motion, optim.seed,
                                      motion_probability, controller, decoded_flow)
    checkpointing = subject.gradient_checkpointing or motion.gradient_checkpointing
    memory = MemorySettings(min(subject.memory.recompute_every, motion.memory.recompute_every),  # the more saving
                            subject.memory.offload_activations or motion.memory.offload_activations,
                            max(subject.memory.blocks_to_swap, motion.memory.blocks_to_swap), subject.memory.offload_device)
    return tuple(run(backbone, recipes, schedule, optim, checkpointing, workdir, progress, log, device, dtype,
                     base_model, {"motion_probability": repr(motion_probability)}, memory, preview))
