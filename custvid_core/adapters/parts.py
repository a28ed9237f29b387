"""Parts: everything a recipe attaches to a backbone and trains, behind one protocol.

A part attaches to a backbone (and detaches without a trace), names its trainable parameters by group,
takes a strength, and exports itself to a file form (tensors and a metadata dict), or to nothing if it is a
training helper. The LoRA (`lora.LoraPart`), the trigger embedding (`embedding.TriggerEmbeddingPart`) and the
alignment projector (`ProjectorPart`) are parts; a new adapter is a new class that follows `Part`.

Strength is what sampling and controllers turn: a float, a tensor with one weight per block (which may carry
gradients, when a trained controller sets it), or a function of the sampling progress (0 at the first step,
1 at the last) giving either. Setting it is cheap enough to do at every sampling step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Protocol, Union, runtime_checkable

import torch
from torch import nn

from ..backbones.wan import WanBackbone
from ..errors import InputError

StrengthValue = Union[float, torch.Tensor]  # a tensor: one weight for every block, or a 0-dim one for all
Strength = Union[StrengthValue, Callable[[float], StrengthValue]]  # or a function of the sampling progress


@dataclass
class Exported:
    """A part in file form: its tensors and what a loader needs to know about them."""

    kind: str  # "lora", "trigger_embedding", ...
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class Part(Protocol):
    name: str

    def attach(self, backbone: WanBackbone, device: torch.device | None) -> ContextManager[None]:
        """Attach to `backbone` while inside; on exit the backbone is exactly as it was."""

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by named group (attached parts only)."""

    def set_strength(self, strength: Strength) -> None:
        """Set the part's strength (1.0: as trained, 0.0: off)."""

    def at_progress(self, progress: float) -> None:
        """Resolve a strength given as a function of the sampling progress, at `progress` in [0, 1]."""

    def export(self) -> Exported | None:
        """The trained part in file form; None for a helper that is thrown away."""


@runtime_checkable
class BlockWeighted(Protocol):
    """A part a controller weighs (DualReal's adapters, a LoRA): one weight per block and batch row, set before
    each forward."""

    def set_block_weights(self, weights: torch.Tensor | None) -> None:
        """Weights `[B or 1, blocks]` on the part's output for the forwards that follow (None: its own default)."""


class PartBase:
    """What most parts share: a name, and a strength held until the progress resolves it. Subclasses apply a
    resolved strength in `_apply_strength`."""

    def __init__(self, name: str):
        self.name = name
        self.strength: Strength = 1.0

    def set_strength(self, strength: Strength) -> None:
        self.strength = strength
        if not callable(strength):
            self._apply_strength(strength)

    def at_progress(self, progress: float) -> None:
        if callable(self.strength):
            self._apply_strength(self.strength(progress))

    def _apply_strength(self, value: StrengthValue) -> None:
        raise NotImplementedError


class ModulePart(PartBase):
    """A part whose trainable parameters are one module's, built on attach (`module`, None while detached), in
    one group named after the part. A part with fixed weights (loaded from a file) keeps the module it built for
    the next attach to a model of the same size on the same device in the same `dtype`: a sampler attaches it
    for every model call, and building copies every weight (to a GPU: a transfer per call)."""

    module: nn.Module | None = None
    dtype: torch.dtype = torch.float32  # what the module is built in: fp32 to train, a model call's dtype to apply
    _kept: tuple[tuple, nn.Module] | None = None

    def _module_for(self, backbone: WanBackbone, device: torch.device | None, build: Callable[[], nn.Module],
                    fixed: bool) -> nn.Module:
        """`build()` (on the CPU, in fp32) on `device` in `self.dtype`; kept and given again if `fixed`."""
        key = (backbone.num_blocks, backbone.dim, None if device is None else torch.device(device), self.dtype)
        if fixed and self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        module = build().to(device=device, dtype=self.dtype)
        self._kept = (key, module) if fixed else None
        return module

    def groups(self) -> dict[str, list[nn.Parameter]]:
        if self.module is None:
            raise InputError("adapter", f"'{self.name}' is not attached", "an attached part")
        return {self.name: list(self.module.parameters())}


@contextlib.contextmanager
def attached(backbone: WanBackbone, parts: Iterable[Part], device: torch.device | None = None) -> Iterator[None]:
    """Attach `parts` to `backbone` while inside, kind by kind in the order each kind first appears, and detach
    them all on exit. A kind whose parts must attach together (LoRAs: one peft injection for all) has a
    classmethod `attach_together(backbone, parts, device, stack)` that enters what it attaches on `stack`."""
    by_kind: dict[type, list[Part]] = {}
    for part in parts:
        by_kind.setdefault(type(part), []).append(part)
    with contextlib.ExitStack() as stack:
        for kind, members in by_kind.items():
            if hasattr(kind, "attach_together"):
                kind.attach_together(backbone, members, device, stack)
            else:
                for part in members:
                    stack.enter_context(part.attach(backbone, device))
        yield


@contextlib.contextmanager
def strengths_set(parts: dict[str, Part], strengths: dict[str, StrengthValue]) -> Iterator[None]:
    """The named parts at the given strengths while inside, back to 1.0 after (parts in training run at 1.0)."""
    try:
        for name, value in strengths.items():
            parts[name].set_strength(value)
        yield
    finally:
        for name in strengths:
            parts[name].set_strength(1.0)


def seeded_linear_init(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every nn.Linear in `module`, in order, as torch's own default does, drawing from `generator`
    (so a part's initial weights depend on its seed alone, not on what else drew from the global generator)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    bound = 1 / math.sqrt(layer.weight.shape[1]) if layer.weight.shape[1] > 0 else 0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def built_unseeded(make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` built without drawing from the global generator (on the meta device, then given CPU memory);
    its values are left for the caller to set."""
    with torch.device("meta"):
        module = make()
    return module.to_empty(device="cpu")


class Projector(nn.Module):
    """REPA's projector: `dim -> hidden -> hidden -> out` with SiLU, applied per token.

    `hidden=0` picks REPA's (and SMRABooth's) 2048 on real models, narrowed to 4x the model's width on
    models under 512 wide, where a 2048-wide MLP on every token would cost about as much as the model.
    """

    def __init__(self, dim: int, out: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or min(2048, 4 * dim)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ProjectorPart(ModulePart):
    """A trainable helper: a REPA projector reading `width` features off a block's hidden states (SuRA, MoRA).
    It adds nothing to the backbone's forward and exports nothing; its initial weights come from `seed`."""

    def __init__(self, name: str, dim: int, width: int, hidden: int = 0, seed: int = 0):
        super().__init__(name)
        self.dim, self.width, self.hidden, self.seed = dim, width, hidden, seed
        self.module: nn.Module | None = None

    @contextlib.contextmanager
    def attach(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        module = built_unseeded(lambda: Projector(self.dim, self.width, self.hidden))
        seeded_linear_init(module, torch.Generator().manual_seed(self.seed))
        self.module = module.to(device)
        try:
            yield
        finally:
            self.module = None


    def _apply_strength(self, value: StrengthValue) -> None:
        pass  # the projector reads the model; it does not change it

    def export(self) -> None:
        return None
