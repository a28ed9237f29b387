"""The training engine: recipes' parts attached to a backbone, their tasks run by the shared loop.

`run` attaches every recipe's parts (`adapters.parts.attached`), hands their groups to `loop.train`, and at
each step asks the phase schedule for the task, switches off the parts the task names (and the other
recipes' own-only parts), casts the data to the compute dtype and runs the task's loss under autocast. It
returns, per recipe, the parts it keeps in file form (`TrainedParts`), with the run's loss history. The
backbone is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..adapters.embedding import KIND as TRIGGER_KIND
from ..adapters.embedding import LearnedTrigger
from ..adapters.lora import LoraSpec
from ..adapters.parts import Exported, attached, strengths_set
from ..backbones.memory import MemorySettings
from ..backbones.wan import WanBackbone
from ..errors import InputError
from .distributed import sharding
from .fingerprint import content_digest, model_signature, settings_record
from .loop import OptimSettings, Progress, StepResult, train
from .tasks import Recipe, Schedule, StepContext, task_at, tasks_in

# The dtypes a run can compute in (`train_*(dtype=...)`); the trainable parameters and optimiser state stay fp32.
TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16's loss scale: the loss's gradient is multiplied by it on the way into the fp16 activations (where
# small gradients would underflow) and divided out again at the fp32 trainable parameters.
FP16_LOSS_SCALE = 1024.0


@dataclass
class TrainedParts:
    """What a recipe trained: its kept parts in file form by name, and the run's loss history (one record per
    step). `spec`, `tensors` and `trigger_embedding` read the main LoRA and the trigger embedding, if any."""

    parts: dict[str, Exported]
    history: list[dict]
    main: str

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec.from_dict(self.parts[self.main].metadata["spec"])

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The main LoRA in ComfyUI's native LoRA form."""
        return self.parts[self.main].tensors

    def of_kind(self, kind: str) -> Exported | None:
        return next((p for p in self.parts.values() if p.kind == kind), None)

    @property
    def trigger_embedding(self) -> torch.Tensor | None:
        """`[tokens, text_dim]`, added at the trigger word's rows; None if the recipe learned none."""
        part = self.of_kind(TRIGGER_KIND)
        return None if part is None else part.tensors[TRIGGER_KIND]

    def learned_trigger(self) -> LearnedTrigger | None:
        """The trigger embedding with the words it was learned at, as Save Trigger Embedding writes it."""
        part = self.of_kind(TRIGGER_KIND)
        return None if part is None else LearnedTrigger(part.tensors[TRIGGER_KIND], part.metadata["trigger_words"])


def compute_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a run's data, forward and LoRA math use: `dtype`, or by default fp32 on a CPU and bf16 on a
    CUDA device that supports it (fp32 elsewhere). Never the weights' dtype: fp8 weights are storage only."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in TRAINING_DTYPES.values():
        raise InputError("training_dtype", f"{dtype}", f"one of {', '.join(TRAINING_DTYPES)}")
    return dtype


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


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's own weights without gradients while inside (the parts attached after, LoRA layers included,
    learn): otherwise every backward computes a gradient the model's size, left on the model; flags put back."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_sharding(dtype: torch.dtype, memory: MemorySettings) -> None:
    """What the "fsdp" strategy cannot run: fp16's loss scale (its hooks sit on the unsharded parameters) and block
    swapping (which moves the blocks' weights that FSDP shards)."""
    if not sharding():
        return
    if dtype == torch.float16:
        raise InputError("training_dtype", "fp16 with strategy \"fsdp\"", "bf16 or fp32 (or strategy \"ddp\")")
    if memory.blocks_to_swap:
        raise InputError("blocks_to_swap", f"{memory.blocks_to_swap} with strategy \"fsdp\"",
                         "0: FSDP already spreads the blocks' weights over the GPUs (or strategy \"ddp\")")


def _about(backbone: WanBackbone, recipes: list[Recipe], dtype: torch.dtype, base_model: str | None,
           run_settings: dict | None) -> dict:
    """What a checkpoint must match to be resumed: the data, the recipe settings that change what is learned
    (named as users set them), the compute dtype and the base model."""
    settings = {**(run_settings or {}), "training_dtype": str(dtype)}
    for r in recipes:
        prefix = f"{r.name}." if len(recipes) > 1 else ""
        kept = settings_record(r.settings, ("optim", "gradient_checkpointing", "memory"))  # not what is learned
        settings.update({prefix + k: v for k, v in kept.items()})
    return {"data": content_digest(*[r.data for r in recipes]), "settings": settings,
            "model": base_model or model_signature(backbone.model)}


def run(backbone: WanBackbone, recipes: list[Recipe], schedule: Schedule, optim: OptimSettings,
        checkpointing: bool = False, workdir: str | Path | None = None, progress: Progress | None = None,
        log: Callable[[str], None] | None = None, device: torch.device | None = None,
        dtype: torch.dtype | None = None, base_model: str | None = None,
        run_settings: dict | None = None, memory: MemorySettings = MemorySettings()) -> list[TrainedParts]:
    """Train `recipes` together, step `i` running `task_at(schedule, i, g)`, and return each recipe's kept parts.
    `device`: where the forward runs (default: the model's first role layer's device); `dtype`: the compute
    dtype (`compute_dtype`); a checkpoint in `workdir` is resumed only for the same data, recipe settings
    (+ `run_settings`, + the compute dtype) and base model (`base_model`, default: a signature of the weights).
    `checkpointing` and `memory` (`MemorySettings`: every k-th block, activations offloaded, blocks swapped) save
    device memory without changing what is learned."""
    device = device or backbone.role_module(0, "self_attn.q").weight.device
    dtype = compute_dtype(device, dtype)
    about = _about(backbone, recipes, dtype, base_model, run_settings) if workdir is not None else None
    parts = {p.name: p for r in recipes for p in r.parts}
    if len(parts) != sum(len(r.parts) for r in recipes):
        names = [p.name for r in recipes for p in r.parts]
        raise InputError("name", f"part names {names}", "different names for the recipes' adapters")
    owner: dict = {}
    for r in recipes:  # a recipe whose schedule runs earlier recipes' tasks (a joint run's controller) owns none
        for task in tasks_in(r.schedule):
            owner.setdefault(task, r)
    for task in tasks_in(schedule):
        unknown = [n for n in task.off if n not in parts]
        if task not in owner or unknown:
            raise InputError("schedule", f"task '{task.name}' " + (f"switches off unknown parts {unknown}" if unknown
                                                                  else "belongs to none of the recipes"),
                             "tasks of the run's recipes, switching off their parts")
    _check_sharding(dtype, memory)
    context = StepContext(backbone, device, dtype)
    # The blocks' memory savings go on before the parts attach: a swapped block's weights are the frozen base's.
    with _frozen(backbone.model), backbone.training_memory(checkpointing, memory, device), \
            attached(backbone, parts.values(), device), contextlib.ExitStack() as stack:
        groups = {name: ps for p in parts.values() for name, ps in p.groups().items()}
        scaled = stack.enter_context(_loss_scaled(groups, FP16_LOSS_SCALE)) if dtype == torch.float16 else None
        forward_dtype = _forward_dtype(backbone, dtype)  # once: the weights' storage does not change in a run

        def step(i: int, g: torch.Generator) -> StepResult:
            task = task_at(schedule, i, g)
            off = [*task.off, *(n for r in recipes if r is not owner[task] for n in r.own_only)]
            with strengths_set(parts, dict.fromkeys(off, 0.0)), \
                    torch.autocast(device.type, dtype=forward_dtype, enabled=forward_dtype != torch.float32):
                loss, terms = task.loss(g, context)
            result = StepResult(loss, terms, update=task.trains)
            return result if scaled is None else replace(result, loss=scaled(result.loss))

        history = train(step, groups, optim, workdir, progress, log, about=about, blocks=backbone.blocks)
        return [TrainedParts({n: parts[n].export() for n in r.returns}, history, r.main) for r in recipes]
