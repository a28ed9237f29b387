"""Subject and motion LoRA training (SMRABooth, with MotionBooth's subject losses).

Both recipes take cached data (latents, text conditioning, DINOv2 tokens, RAFT flow computed once
per data set) and any Wan backbone (ComfyUI's native model, diffusers', the shapes world), train
peft LoRAs on the backbone's roles, and return the adapter in ComfyUI's native LoRA form. The
backbone is left exactly as it was.

Subject (`train_subject`): images as one-frame videos, prompt with a placeholder ("sks").
  loss = region loss (masked v-MSE) + alignment_weight * SuRA (projector on a block's hidden
  states vs the image's DINOv2 patch tokens) + token_attention_weight * STCA (the trigger word's
  cross-attention vs the mask), alternating with preservation batches (any captioned clips, plain
  v-MSE * preservation_weight) as MotionBooth does. Where photos can only be shown as still clips
  (the shapes world), a throw-away stillness LoRA learns stills of the preservation clips and runs
  frozen under the subject LoRA (Still-Moving), so the subject LoRA does not learn to stand still.
  Optionally a trigger embedding (SynMotion's subject embedding) learns alongside the LoRA on the photos.
Motion (`train_motion`): MotionDirector's two phases, alternating step by step: a spatial LoRA
  learns the clips' appearance from single frames; the motion LoRA learns the clips with the
  spatial LoRA active but frozen, with the appearance-debiased loss and MoRA (a projector reads
  the RAFT flow of each token's place off a block's hidden states; or, as the authors' code does, RAFT's
  flow of the decoded clean-latent prediction against the reference flow). The spatial LoRA is thrown away.
Joint (`train_joint`): both recipes in one run, a subject or a motion step at random, each LoRA
  learning with the other attached and frozen (DualReal's dual-aware adaptation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..adapters.embedding import TriggerEmbedding
from ..adapters.lora import MOTION_ROLES, SUBJECT_ROLES, LoraAdapters, LoraSpec
from ..backbones.wan import WanBackbone
from ..errors import InputError
from .datasets import SubjectSet, VideoSet
from .fingerprint import content_digest, model_signature, settings_record
from .loop import OptimSettings, Progress, StepResult, train
from .objectives import (
    DecodedFlow,
    Projector,
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
    # the LoRA on the photos (needs subject_tokens). Returned as `TrainedLora.trigger_embedding`.
    trigger_embedding: bool = False
    moving_share: float = 0.5  # of the photo steps, the share on the moving clips (if the data set has them)
    gradient_checkpointing: bool = False
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
    name: str = "motion"


@dataclass
class TrainedLora:
    """A trained adapter in ComfyUI's native LoRA form, with its loss history."""

    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    history: list[dict]
    trigger_embedding: torch.Tensor | None = None  # [tokens, text_dim], added at the trigger word's rows


def _pick(n: int, batch: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (batch,), generator=g)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[idx] if x.shape[0] > 1 else x.expand(len(idx), *x.shape[1:])


# The dtypes a run can compute in (`train_*(dtype=...)`); the LoRA parameters and optimiser state stay fp32.
TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16's loss scale: the loss's gradient is multiplied by it on the way into the fp16 activations (where
# small gradients would underflow) and divided out again at the fp32 trainable parameters.
FP16_LOSS_SCALE = 1024.0


def compute_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a run's data, forward and LoRA math use: `dtype`, or by default fp32 on a CPU and bf16 on a
    CUDA device that supports it (fp32 elsewhere). Never the weights' dtype: fp8 weights are storage only."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in TRAINING_DTYPES.values():
        raise InputError("training_dtype", f"{dtype}", f"one of {', '.join(TRAINING_DTYPES)}")
    return dtype


def _device(backbone: WanBackbone, device: torch.device | None) -> torch.device:
    return device or backbone.role_module(0, "self_attn.q").weight.device


def _forward_dtype(backbone: WanBackbone, dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward runs in under autocast (fp32: autocast off). Below fp32, autocast runs every matmul
    (the LoRA's too) in the compute dtype. At fp32, a host whose layers cast their weights to the input's dtype
    (`casts_weights`) computes in fp32 from any stored precision; plain torch layers stored in 16 bits compute in
    those 16 bits (casting them up would copy the whole base), with the data, loss and LoRA parameters still fp32."""
    if dtype == torch.float32 and not backbone.casts_weights:
        stored = {p.dtype for p in backbone.model.parameters()}
        dtype = next((d for d in (torch.bfloat16, torch.float16) if d in stored), dtype)
    return dtype


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by `scale` (a loss scale)."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.scale = scale
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@contextlib.contextmanager
def _loss_scaled(groups: dict[str, list[torch.nn.Parameter]], scale: float) -> Iterator[Callable]:
    """Yields `scaled(loss)`; while inside, the gradient reaching each trainable parameter is divided by `scale`."""
    handles = [p.register_hook(lambda grad: grad / scale) for ps in groups.values() for p in ps]
    try:
        yield lambda loss: _ScaleGradient.apply(loss, scale)
    finally:
        for h in handles:
            h.remove()


def _check_block(block: int, backbone: WanBackbone, name: str) -> None:
    if not 0 <= block < backbone.num_blocks:
        raise InputError(name, f"block {block}", f"a block from 0 to {backbone.num_blocks - 1}")


class _Objective:
    """A recipe's share of a training run: its LoRA (`spec`), an optional throw-away helper LoRA trained
    alongside and discarded, and an optional alignment projector onto `projector_width` features."""

    def __init__(self, backbone: WanBackbone, settings, helper: LoraSpec | None, projector_width: int = 0):
        self.backbone, self.settings, self.helper = backbone, settings, helper
        self.spec = LoraSpec(settings.name, tuple(settings.roles), settings.rank)
        self.projector_width = projector_width
        self.projector = None
        self.embedding: TriggerEmbedding | None = None

    @property
    def specs(self) -> list[LoraSpec]:
        return [self.spec] + ([self.helper] if self.helper is not None else [])

    @property
    def projector_group(self) -> str:
        return f"{self.spec.name}_alignment_projector"

    @property
    def embedding_group(self) -> str:
        return f"{self.spec.name}_trigger_embedding"

    def trainables(self, adapters: LoraAdapters, device: torch.device) -> dict[str, list[torch.nn.Parameter]]:
        groups = {s.name: adapters.parameters(s.name) for s in self.specs}
        if self.projector_width:
            torch.manual_seed(self.settings.optim.seed)
            self.projector = Projector(self.backbone.dim, self.projector_width, self.settings.projector_hidden).to(device)
            groups[self.projector_group] = list(self.projector.parameters())
        if self.embedding is not None:
            self.embedding.to(device)
            groups[self.embedding_group] = list(self.embedding.parameters())
        return groups

    def main_groups(self) -> list[str]:
        """What a step of the main objective updates: the LoRA, the projector and the trigger embedding."""
        return [self.spec.name] + [g for g, m in ((self.projector_group, self.projector),
                                                  (self.embedding_group, self.embedding)) if m is not None]

    def trained(self, adapters: LoraAdapters, history: list[dict]) -> TrainedLora:
        embedding = None if self.embedding is None else self.embedding.residual().detach().cpu()
        return TrainedLora(self.spec, adapters.native_state_dict(self.spec.name), history, embedding)


class _SubjectObjective(_Objective):
    """One subject step, in turn: the stillness LoRA on stills of the preservation clips (if any), the photos
    (region loss, + SuRA, + token attention), the preservation clips."""

    def __init__(self, backbone: WanBackbone, data: SubjectSet, settings: SubjectSettings):
        self.data = data
        self.align = settings.alignment_weight > 0 and data.dino_tokens is not None
        self.preserve = settings.preservation_weight > 0 and data.preservation is not None
        if self.align:
            _check_block(settings.alignment_block, backbone, "alignment_block")
        self.attend = settings.token_attention_weight > 0 and bool(data.subject_tokens) and data.masks is not None
        self.attention_blocks = list(range(backbone.num_blocks) if settings.token_attention_blocks is None
                                     else settings.token_attention_blocks)
        for b in self.attention_blocks if self.attend else ():
            _check_block(b, backbone, "token_attention_blocks")
        stillness = None
        if settings.stillness_rank > 0:
            if not self.preserve or data.preservation.stills is None:
                raise InputError("stillness_rank", "a stillness LoRA learns from stills of the preservation clips, "
                                 "and there are none", "preservation clips with their stills, or 0")
            stillness = LoraSpec(f"{settings.name}_stillness", tuple(settings.stillness_roles), settings.stillness_rank)
        super().__init__(backbone, settings, stillness, data.dino_tokens.shape[1] if self.align else 0)
        if settings.region_margin < 0:
            raise InputError("region_margin", f"{settings.region_margin}", "0 or more latent cells")
        if not 0 <= settings.moving_share <= 1:
            raise InputError("moving_share", f"{settings.moving_share}", "a share from 0 to 1")
        # The region loss's masks, widened once here rather than on every step.
        # Keyed by whether a step takes the moving clips.
        self.region_masks = {moving: widened(d.masks, settings.region_margin)
                             for moving, d in ((False, data), (True, data.moving)) if d is not None and d.masks is not None} \
            if settings.region_loss else {}
        if settings.trigger_embedding:
            if not data.subject_tokens:
                raise InputError("trigger_embedding", "a trigger embedding is learned at the trigger word, and the "
                                 "subject images have none", "trigger words in the subject's prompt, or off")
            self.embedding = TriggerEmbedding(len(data.subject_tokens), data.context.shape[-1], seed=settings.optim.seed)

    def step(self, i: int, g: torch.Generator, adapters: LoraAdapters, device: torch.device,
             dtype: torch.dtype) -> StepResult:
        data, settings, backbone, name, stillness = self.data, self.settings, self.backbone, self.spec.name, self.helper
        # 0: the stillness LoRA learns stills of the preservation clips (the subject LoRA off);
        # 1: the subject's photos; 2: preservation clips, which move (the stillness LoRA off).
        phase = i % 3 if stillness is not None else (2 if self.preserve and i % 2 == 1 else 1)
        if phase != 1:
            still = phase == 0
            clips = data.preservation
            idx = _pick(clips.latents.shape[0], settings.batch, g)
            if still:
                k = int(torch.randint(clips.stills.shape[1], (1,), generator=g))
                x0 = clips.stills[idx, k].to(device, dtype)
            else:
                x0 = clips.latents[idx].to(device, dtype)
            sigma = settings.sigmas(len(idx), g)
            x, target = add_noise(x0, sigma, g)
            off = {name if still else stillness.name: 0.0} if stillness is not None else {}
            with adapters.strengths_set(**off):
                v = backbone.forward(x, sigma.to(device), _rows(clips.context, idx).to(device, dtype))
            if still:
                loss = region_loss(v, target)
                return StepResult(loss, {"stillness": float(loss.detach())}, update=[stillness.name])
            loss = settings.preservation_weight * region_loss(v, target)
            return StepResult(loss, {"preservation": float(loss.detach())}, update=[name])
        moving = data.moving is not None and float(torch.rand((), generator=g)) < settings.moving_share
        items = data.moving if moving else data
        align = self.align and not moving  # the photos' features, not the moving clips'
        attend = self.attend and items.masks is not None
        idx = _pick(items.latents.shape[0], settings.batch, g)
        x0 = items.latents[idx].to(device, dtype)
        sigma = settings.sigmas(len(idx), g)
        x, target = add_noise(x0, sigma, g)
        mask = self.region_masks[moving][idx].to(device) if moving in self.region_masks else None
        context = _rows(items.context, idx).to(device, dtype)
        if self.embedding is not None:
            context = self.embedding(context, data.subject_tokens)
        grid = backbone.token_grid(x.shape)
        with contextlib.ExitStack() as stack:
            hidden = stack.enter_context(backbone.capture(settings.alignment_block)) if align else None
            attention = stack.enter_context(backbone.capture_cross_attention(self.attention_blocks)) if attend \
                else None
            v = backbone.forward(x, sigma.to(device), context)
        l_region = region_loss(v, target, mask)
        loss = l_region
        parts = {"region" if mask is not None else "mse": float(l_region.detach())}
        if align:
            l_align = subject_alignment_loss(self.projector, hidden[settings.alignment_block], grid,
                                             items.dino_tokens[idx].to(device))
            loss = loss + settings.alignment_weight * l_align
            parts["alignment"] = float(l_align.detach())
        if attend:
            maps = [subject_token_attention(a["q"], a["k"], a["heads"], list(data.subject_tokens))
                    for a in attention.values()]
            l_attend = token_attention_loss(maps, items.masks[idx].to(device), grid)
            loss = loss + settings.token_attention_weight * l_attend
            parts["token_attention"] = float(l_attend.detach())
        return StepResult(loss, parts, update=self.main_groups())


class _MotionObjective(_Objective):
    """One motion step: on even steps the throw-away spatial LoRA learns single frames (MotionDirector);
    otherwise the motion LoRA learns the clips (+ the debiased loss, + MoRA)."""

    def __init__(self, backbone: WanBackbone, data: VideoSet, settings: MotionSettings,
                 decoded_flow: DecodedFlow | None = None):
        self.data, self.decoded_flow = data, decoded_flow
        spatial = None
        if settings.spatial_rank > 0:
            spatial = LoraSpec(f"{settings.name}_spatial", tuple(settings.spatial_roles), settings.spatial_rank)
        if settings.alignment not in MOTION_ALIGNMENT:
            raise InputError("motion_alignment", f"'{settings.alignment}'", f"one of {', '.join(MOTION_ALIGNMENT)}")
        self.align = settings.alignment_weight > 0 and data.flow is not None
        self.decode_align = self.align and settings.alignment == "decoded_flow"
        if self.decode_align and decoded_flow is None:
            raise InputError("motion_alignment", "'decoded_flow' needs the VAE and a RAFT to decode and measure with",
                             "a VAE and a RAFT connected, or 'features'")
        if self.align and not self.decode_align:
            _check_block(settings.alignment_block, backbone, "alignment_block")
        self.frames = data.latents.shape[2]
        if spatial is not None and data.stills is None and self.frames < 2:
            raise InputError("motion clips", f"{self.frames} latent frame and no single frames",
                             "clips of at least 2 latent frames (5+ frames on Wan), or stills of their frames")
        # The feature-level MoRA projector reads the flow (2 values per token) off a block.
        super().__init__(backbone, settings, spatial, 2 if self.align and not self.decode_align else 0)

    def step(self, i: int, g: torch.Generator, adapters: LoraAdapters, device: torch.device,
             dtype: torch.dtype) -> StepResult:
        data, settings, backbone, frames = self.data, self.settings, self.backbone, self.frames
        idx = _pick(data.latents.shape[0], settings.batch, g)
        context = _rows(data.context, idx).to(device, dtype)
        sigma = settings.sigmas(len(idx), g)
        spatial = self.helper
        if spatial is not None and i % 2 == 0:
            # Spatial phase: single frames as images; only the spatial LoRA learns, with the motion
            # LoRA switched off so it does not absorb appearance.
            if data.stills is not None:
                k = int(torch.randint(data.stills.shape[1], (1,), generator=g))
                x0 = data.stills[idx, k].to(device, dtype)
            else:
                f = int(torch.randint(frames, (1,), generator=g))
                x0 = data.latents[idx][:, :, f:f + 1].to(device, dtype)
            x, target = add_noise(x0, sigma, g)
            with adapters.strengths_set(**{self.spec.name: 0.0}):
                v = backbone.forward(x, sigma.to(device), context)
            loss = region_loss(v, target)
            return StepResult(loss, {"spatial": float(loss.detach())}, update=[spatial.name])
        x0 = data.latents[idx].to(device, dtype)
        x, target = add_noise(x0, sigma, g)
        if self.decode_align:
            v = backbone.forward(x, sigma.to(device), context)
            x0_pred = x - sigma.to(device, dtype).view(-1, 1, 1, 1, 1) * v  # x = s*noise + (1-s)*x0, v = noise-x0
            l_align = decoded_flow_loss(self.decoded_flow, x0_pred, data.flow[idx].to(device), g)
        elif self.align:
            with backbone.capture(settings.alignment_block) as hidden:
                v = backbone.forward(x, sigma.to(device), context)
            grid = backbone.token_grid(x.shape)
            flow_tokens = flow_on_token_grid(data.flow[idx].to(device), grid)
            l_align = motion_alignment_loss(self.projector, hidden[settings.alignment_block], grid, flow_tokens)
        else:
            v = backbone.forward(x, sigma.to(device), context)
            l_align = torch.zeros((), device=device)
        l_mse = region_loss(v, target)
        loss = l_mse + settings.alignment_weight * l_align
        parts = {"mse": float(l_mse.detach())}
        if settings.debiased_weight > 0 and frames > 1:  # one latent frame has no other frame to debias by
            ref = int(torch.randint(frames, (1,), generator=g))
            l_debiased = region_loss(appearance_debiased(v, ref), appearance_debiased(target, ref))
            loss = loss + settings.debiased_weight * l_debiased
            parts["debiased"] = float(l_debiased.detach())
        if self.align:
            parts["alignment"] = float(l_align.detach())
        return StepResult(loss, parts, update=self.main_groups())


def _run(backbone: WanBackbone, objectives: list, optim: OptimSettings, checkpointing: bool,
         choose: Callable[[int, torch.Generator], int], workdir, progress, log, device,
         dtype: torch.dtype | None, base_model: str | None, recipe: dict | None = None) -> list[TrainedLora]:
    """Attach every objective's adapters, train, and return each objective's main adapter. `choose(step, g)`
    picks the objective that takes a step; the others' main adapters run in the forward pass, frozen, and
    their throw-away helpers (a spatial or stillness LoRA, after the main one in `specs`) are off. The data
    is cast to the compute dtype `dtype`; the LoRAs stay fp32. A checkpoint in `workdir` is resumed only for
    the same data, settings (+ `recipe`, + the compute dtype) and base model."""
    device = _device(backbone, device)
    dtype = compute_dtype(device, dtype)
    about = None
    if workdir is not None:
        settings = {**(recipe or {}), "training_dtype": str(dtype)}
        for o in objectives:  # the recipe settings that change what is learned, named as users set them
            prefix = f"{o.settings.name}." if len(objectives) > 1 else ""
            leave_out = ("optim", "gradient_checkpointing")
            settings.update({prefix + k: v for k, v in settings_record(o.settings, leave_out).items()})
        about = {"data": content_digest(*[o.data for o in objectives]), "settings": settings,
                 "model": base_model or model_signature(backbone.model)}
    specs = [s for o in objectives for s in o.specs]
    with LoraAdapters(backbone, specs, seed=optim.seed, device=device) as adapters, \
            backbone.checkpointing(checkpointing), contextlib.ExitStack() as stack:
        groups = {}
        for objective in objectives:
            groups.update(objective.trainables(adapters, device))
        scaled = stack.enter_context(_loss_scaled(groups, FP16_LOSS_SCALE)) if dtype == torch.float16 else None
        forward_dtype = _forward_dtype(backbone, dtype)  # once: the weights' storage does not change in a run

        def step(i: int, g: torch.Generator) -> StepResult:
            chosen = objectives[choose(i, g)]
            helpers_off = {s.name: 0.0 for o in objectives if o is not chosen for s in o.specs[1:]}
            with adapters.strengths_set(**helpers_off), \
                    torch.autocast(device.type, dtype=forward_dtype, enabled=forward_dtype != torch.float32):
                result = chosen.step(i, g, adapters, device, dtype)
            return result if scaled is None else replace(result, loss=scaled(result.loss))

        history = train(step, groups, optim, workdir, progress, log, about=about)
        return [o.trained(adapters, history) for o in objectives]


def train_subject(backbone: WanBackbone, data: SubjectSet, settings: SubjectSettings = SubjectSettings(),
                  workdir: str | Path | None = None, progress: Progress | None = None,
                  log: Callable[[str], None] | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, base_model: str | None = None) -> TrainedLora:
    """`device`: where the forward runs (a partially loaded model's weights may sit elsewhere);
    default: the model's first parameter's device. `dtype`: the compute dtype (`compute_dtype`), whatever
    the weights are stored in. `base_model`: the base model's signature for the checkpoint (a host that
    merged LoRAs into the weights gives its own); default: from its weights."""
    objective = _SubjectObjective(backbone, data, settings)
    return _run(backbone, [objective], settings.optim, settings.gradient_checkpointing, lambda i, g: 0,
                workdir, progress, log, device, dtype, base_model)[0]


def train_motion(backbone: WanBackbone, data: VideoSet, settings: MotionSettings = MotionSettings(),
                 workdir: str | Path | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None, device: torch.device | None = None,
                 decoded_flow: DecodedFlow | None = None, dtype: torch.dtype | None = None,
                 base_model: str | None = None) -> TrainedLora:
    """`decoded_flow`: the decoder and RAFT for `alignment="decoded_flow"`; `device`, `dtype`, `base_model`: as
    `train_subject`."""
    objective = _MotionObjective(backbone, data, settings, decoded_flow)
    return _run(backbone, [objective], settings.optim, settings.gradient_checkpointing, lambda i, g: 0,
                workdir, progress, log, device, dtype, base_model)[0]


def train_joint(backbone: WanBackbone, subject_data: SubjectSet, motion_data: VideoSet,
                subject: SubjectSettings = SubjectSettings(), motion: MotionSettings = MotionSettings(),
                optim: OptimSettings = OptimSettings(steps=600, lr=1e-4), motion_probability: float = 0.5,
                workdir: str | Path | None = None, progress: Progress | None = None,
                log: Callable[[str], None] | None = None, device: torch.device | None = None,
                decoded_flow: DecodedFlow | None = None, dtype: torch.dtype | None = None,
                base_model: str | None = None) -> tuple[TrainedLora, TrainedLora]:
    """Subject and motion LoRAs trained together (DualReal's dual-aware adaptation): each step is a motion
    step with probability `motion_probability`, else a subject step; both LoRAs run in every forward pass
    and only the stepping one learns, so each learns in the presence of the other it will be used with.
    `optim` replaces the two settings' own (one optimiser, one schedule, one checkpoint)."""
    if not 0.0 < motion_probability < 1.0:
        raise InputError("motion_probability", f"{motion_probability}", "a probability strictly between 0 and 1")
    objectives = [_SubjectObjective(backbone, subject_data, subject),
                  _MotionObjective(backbone, motion_data, motion, decoded_flow)]
    names = [s.name for o in objectives for s in o.specs]
    if len(set(names)) != len(names):
        raise InputError("name", f"adapter names {names}", "different names for the subject and motion LoRAs")

    def choose(i: int, g: torch.Generator) -> int:
        return int(float(torch.rand((), generator=g)) < motion_probability)

    checkpointing = subject.gradient_checkpointing or motion.gradient_checkpointing
    subject_lora, motion_lora = _run(backbone, objectives, optim, checkpointing, choose, workdir, progress, log, device,
                                     dtype, base_model, {"motion_probability": repr(motion_probability)})
    return subject_lora, motion_lora


def with_steps(settings, steps: int):
    """The same settings with another step count (benchmarks and tests shorten runs)."""
    return replace(settings, optim=replace(settings.optim, steps=steps))
