"""DualReal's recipe: identity and motion adapters trained jointly, weighed by the StageBlender controller.

Parts: the identity and motion adapters of every block (`adapters.dualreal.DualAdapterPart`) and the controller
(`adapters.stage_blender.StageBlenderPart`). Tasks: `identity` (the subject's photos as one-frame videos, and its
moving clips where the set has them) and `motion` (the clips; the motion adapters take the first frame's image
embedding where given); both regress Wan's velocity (plain MSE, as the authors' diffusion loss). Schedule:
`Random([(p, motion), (1 - p, identity)])`. Both adapters run in every forward; only the stepping task's adapter
learns (the gradient mask: the task's `trains`), the controller learns every step. Each step's record holds its
task's loss and, with a controller, the identity weight it gave each group of blocks (`identity_weight_<g>`, the
mean over the batch).
The defaults are the authors' recipe: AdamW (0.9, 0.95), weight decay 1e-4, lr 1e-3, 200 warm-up steps, cosine to
zero (their "cosine with restarts" with its one cycle), gradient norm 1.0, 1000 steps. With them the controller can
saturate (its sigmoid pinned at 0 or 1 in a group, one adapter off there for good): a run says so in its log
(`saturated_groups`), and `controller_lr` gives the controller a learning rate of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters.dualreal import DualAdapterPart, DualAdapterSpec, DualRealWeights
from ..adapters.stage_blender import CODE_SCALE, WEIGHTINGS, StageBlenderPart, group_count
from ..backbones.memory import MemorySettings
from ..backbones.wan import WanBackbone
from ..errors import InputError
from .datasets import SubjectSet, VideoSet, single_size
from .distributed import own_rows
from .engine import PreviewParts, TrainedParts, run
from .loop import OptimSettings, Progress
from .objectives import SigmaSampler, add_noise, region_loss
from .tasks import Random, Recipe, Schedule, StepContext, Task


def _authors_optim() -> OptimSettings:
    return OptimSettings(steps=1000, lr=1e-3, warmup=200, min_lr_ratio=0.0, weight_decay=1e-4, grad_clip=1.0,
                         betas=(0.9, 0.95))


@dataclass
class DualRealSettings:
    bottleneck: int = 64
    groups: int | None = None  # groups of consecutive blocks the controller weighs apart; None: 7 (or every block)
    controller: bool = True  # off: fixed weights (0.1 each)
    controller_lr: float | None = None  # the controller's own learning rate; None: the adapters' (the authors')
    weighting: str = "code"  # WEIGHTINGS: the code's (w, 0.2 - w) or the paper's (w, 1 - w)
    residual: str = "code"  # the adapters' residual: the code's (+ x) or the paper's pure one
    condition_lam: float = 1.0  # the image embedding's weight in the motion adapters' input
    motion_probability: float = 0.5
    moving_share: float = 0.5  # of the identity steps, the share on the subject's moving clips (if the set has them)
    gradient_mask: bool = True  # off: both adapters learn on every step (an ablation)
    batch: int = 1
    sigmas: SigmaSampler = field(default_factory=SigmaSampler)
    optim: OptimSettings = field(default_factory=_authors_optim)
    gradient_checkpointing: bool = False
    memory: MemorySettings = MemorySettings()  # more memory savings: every k-th block, offloading, block swap
    name: str = "dualreal"


@dataclass
class ImageEmbeddings:
    """The motion adapters' condition: an image embedding `[N, D]` of each clip's first frame, and of the subject's
    photos (one for all, or one per photo; the motion adapters run on identity steps too, with what they will
    see at inference: the subject's reference image)."""

    clips: torch.Tensor
    subject: torch.Tensor


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[idx] if x.shape[0] > 1 else x.expand(len(idx), *x.shape[1:])


def _check(settings: DualRealSettings, subject: SubjectSet, clips: VideoSet, embeddings: ImageEmbeddings | None,
           backbone: WanBackbone) -> None:
    backbone.require_text_to_video("DualReal")
    if not 0.0 < settings.motion_probability < 1.0:
        raise InputError("motion_probability", f"{settings.motion_probability}", "a probability strictly between 0 and 1")
    if not 0.0 <= settings.moving_share <= 1.0:
        raise InputError("moving_share", f"{settings.moving_share}", "a share from 0 to 1")
    if settings.weighting not in WEIGHTINGS:
        raise InputError("weighting", f"'{settings.weighting}'", f"one of {WEIGHTINGS}")
    if settings.controller:
        group_count(settings.groups, backbone.num_blocks)
    if settings.controller_lr is not None and not 0 < settings.controller_lr < 1:
        raise InputError("controller_learning_rate", f"{settings.controller_lr}",
                         "a learning rate between 0 and 1, e.g. 1e-5")
    if embeddings is None:
        return
    for what, e, n in (("clips", embeddings.clips, clips.latents.shape[0]),
                       ("subject", embeddings.subject, subject.latents.shape[0])):
        if e.ndim != 2 or e.shape[0] not in ((n,) if what == "clips" else (1, n)):
            raise InputError("image_embeddings", f"{what}: shape {tuple(e.shape)}",
                             f"[{n}, width]: one embedding per {'clip' if what == 'clips' else 'photo (or one for all)'}")
    moving = subject.moving
    if embeddings.subject.shape[0] > 1 and moving is not None and moving.photo is None:
        raise InputError("image_embeddings", "one per photo, and the subject's moving clips do not say which photo "
                         "each shows", "one embedding for all photos, or moving clips made by subject_set")
    if embeddings.clips.shape[1] != embeddings.subject.shape[1]:
        raise InputError("image_embeddings", f"widths {embeddings.clips.shape[1]} (clips) and "
                         f"{embeddings.subject.shape[1]} (subject)", "one image encoder for both")


def dualreal_recipe(backbone: WanBackbone, subject: SubjectSet, clips: VideoSet, settings: DualRealSettings,
                    image_embeddings: ImageEmbeddings | None = None) -> Recipe:
    """DualReal's parts, tasks and schedule; the parts' initial weights come from the run's seed."""
    subject, clips = single_size(subject, "subject"), single_size(clips, "clips")
    _check(settings, subject, clips, image_embeddings, backbone)
    seed, name = settings.optim.seed, settings.name
    width = image_embeddings.clips.shape[1] if image_embeddings is not None else 0
    identity = DualAdapterPart(f"{name}_identity", "identity", DualAdapterSpec(settings.bottleneck, 0,
                                                                               settings.condition_lam, settings.residual),
                               seed)
    motion = DualAdapterPart(f"{name}_motion", "motion", DualAdapterSpec(settings.bottleneck, width,
                                                                         settings.condition_lam, settings.residual), seed)
    parts = [identity, motion]
    controller = None
    if settings.controller:
        controller = StageBlenderPart(f"{name}_controller", identity, motion, settings.groups, settings.weighting, seed)
        parts.append(controller)
    learns_always = (controller.name,) if controller is not None else ()
    both = (identity.name, motion.name)

    def loss_on(latents: torch.Tensor, context: torch.Tensor, condition: torch.Tensor | None, term: str):
        def loss(g: torch.Generator, ctx: StepContext):
            idx = torch.randint(latents.shape[0], (settings.batch,), generator=g)
            x0 = latents[idx].to(ctx.device, ctx.dtype)
            sigma = settings.sigmas(len(idx), g)
            x, target = add_noise(x0, sigma, g)
            idx, sigma, x, target = own_rows(idx, sigma, x, target)
            motion.set_condition(None if condition is None else _rows(condition, idx).to(ctx.device))
            v = ctx.backbone.forward(x, sigma.to(ctx.device), _rows(context, idx).to(ctx.device, ctx.dtype))
            l_mse = region_loss(v, target)
            record = {term: float(l_mse.detach())}
            if controller is not None:  # what the controller weighed this step with: its learning, step by step
                weights = controller.identity_weights().mean(0)
                record.update({f"identity_weight_{g}": float(w) for g, w in enumerate(weights)})
            return l_mse, record

        return loss

    def trains(adapter: DualAdapterPart) -> tuple[str, ...]:
        return (*(both if not settings.gradient_mask else (adapter.name,)), *learns_always)

    subject_condition = image_embeddings.subject if image_embeddings is not None else None
    clip_condition = image_embeddings.clips if image_embeddings is not None else None
    photos: Schedule = Task("identity", loss_on(subject.latents, subject.context, subject_condition, "identity"),
                            trains(identity))
    if subject.moving is not None:
        # Each moving clip shows one of the photos: that photo's embedding conditions it.
        moving_condition = subject_condition
        if subject_condition is not None and subject_condition.shape[0] > 1:
            moving_condition = subject_condition[subject.moving.photo]
        moving = Task("identity_moving", loss_on(subject.moving.latents, subject.moving.context, moving_condition,
                                                 "identity_moving"), trains(identity))
        photos = Random([(settings.moving_share, moving), (1 - settings.moving_share, photos)])
    learn_motion = Task("motion", loss_on(clips.latents, clips.context, clip_condition, "motion"), trains(motion))
    schedule = Random([(settings.motion_probability, learn_motion), (1 - settings.motion_probability, photos)])
    return Recipe(name, parts, schedule, returns=tuple(p.name for p in parts), settings=settings,
                  data=(subject, clips, image_embeddings))


SATURATION_WINDOW = 50  # steps (at most half the run)


def saturated_groups(history: list[dict], weighting: str = "code") -> list[int]:
    """The groups of blocks whose controller weight stayed within a thousandth of 0 or of its maximum over the run's
    last `SATURATION_WINDOW` steps (or its last half): the sigmoid gives no gradient there, so training will not
    move them back, and in them one of the two adapters adds nothing."""
    if len(history) < 2:
        return []
    keys = sorted((k for k in history[-1] if k.startswith("identity_weight_")),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    top = CODE_SCALE if weighting == "code" else 1.0
    window = history[-min(SATURATION_WINDOW, len(history) // 2):]
    return [int(k.rsplit("_", 1)[1]) for k in keys
            if all(r[k] < 1e-3 * top for r in window) or all(r[k] > (1 - 1e-3) * top for r in window)]


def dualreal_weights(trained: TrainedParts, name: str = "dualreal") -> DualRealWeights:
    """A DualReal run's parts by role, as `save_dualreal` writes them."""
    roles = {"identity": f"{name}_identity", "motion": f"{name}_motion", "controller": f"{name}_controller"}
    return DualRealWeights({role: trained.parts[n] for role, n in roles.items() if n in trained.parts})


def train_dualreal(backbone: WanBackbone, subject: SubjectSet, clips: VideoSet,
                   settings: DualRealSettings = DualRealSettings(), image_embeddings: ImageEmbeddings | None = None,
                   workdir: str | Path | None = None, progress: Progress | None = None,
                   log: Callable[[str], None] | None = None, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, base_model: str | None = None,
                   preview: PreviewParts | None = None) -> TrainedParts:
    """Train DualReal's adapters and controller on `subject` and `clips`; the parts are `<name>_identity`,
    `<name>_motion` and `<name>_controller` (`dualreal_weights` gives them by role). `image_embeddings`: condition
    the motion adapters (then always needed with them); `device`, `dtype`, `base_model`, `preview`: as
    `train_subject`."""
    recipe = dualreal_recipe(backbone, subject, clips, settings, image_embeddings)
    optim = settings.optim
    if settings.controller and settings.controller_lr is not None:
        optim = replace(optim, lr_factors=((f"{settings.name}_controller", settings.controller_lr / optim.lr),))
    trained = run(backbone, [recipe], recipe.schedule, optim, settings.gradient_checkpointing, workdir,
                  progress, log, device, dtype, base_model, memory=settings.memory, preview=preview)[0]
    stuck = saturated_groups(trained.history, settings.weighting) if settings.controller else []
    if stuck and log is not None:
        log(f"the StageBlender controller is saturated in {len(stuck)} of its groups of blocks ({stuck}): there it "
            "gives one adapter all the weight and the other none, and it cannot learn its way back. A lower "
            "controller learning rate (e.g. 1e-5) keeps it from saturating")
    return trained
