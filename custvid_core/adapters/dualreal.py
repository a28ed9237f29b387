"""DualReal's dual adapters: an identity and a motion adapter in every block, beside the self-attention and the FFN.

Each adapter reads the normalised, modulated tokens `x` that feed its sublayer and adds to the sublayer's output,
before the block's gate (`WanBackbone.add_residual`): `out = up(gelu(down(h)))`, a bottleneck (64 wide) with `up`
zero-initialised, plus `x` itself in the authors' code (`residual="code"`, the default; so at initialisation each
adapter adds its weight times `x`) or not in the paper (`residual="pure"`, zero at initialisation). The motion
adapter may take an image embedding `c` `[B, D_img]` (a CLIP vision embedding of the motion clip's first frame in
training, of the subject's reference at inference): `h = x + lam * W_cond(c)`, else `h = x`.

The output is scaled by the block's weight: the part's strength (a float, or one weight per block) times the weight
a StageBlender controller sets for the block's group at this forward (`set_block_weights`, one row per batch row,
with gradients while training), or times `FIXED_WEIGHT` without a controller (the code's 0.1).

The identity and the motion adapters are two parts of one kind (`DualAdapterPart`, roles "identity" and
"motion"), each its own trainable group and strength; attached together, they share one residual per sublayer.
`save_dualreal` / `load_dualreal` keep both and the controller in one safetensors file; they keep a joint LoRA
run's two LoRAs and controller the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.wan import RESIDUAL_SITES, WanBackbone
from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .lora import base_model_signature
from .parts import Exported, ModulePart, StrengthValue, built_unseeded, seeded_linear_init

ROLES = ("identity", "motion")
RESIDUALS = ("code", "pure")
ADAPTER_KIND = "dualreal_adapter"
FILE_KIND = "dualreal"
FIXED_WEIGHT = 0.1  # an adapter's weight in every block without a controller (the authors' alpha)


class Adapter(nn.Module):
    """`up(gelu(down(h))) (+ x)`, `h = x + lam * condition(c)` where the adapter is conditioned."""

    def __init__(self, dim: int, bottleneck: int, condition_dim: int = 0, residual: str = "code"):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.condition = nn.Linear(condition_dim, dim) if condition_dim else None
        self.residual = residual

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
        h = x if c is None else x + lam * self.condition(c)[:, None]
        out = self.up(F.gelu(self.down(h)))
        return out + x if self.residual == "code" else out


class BlockAdapters(nn.Module):
    """One adapter per residual site of every block: `blocks[b][site]`."""

    def __init__(self, blocks: int, dim: int, bottleneck: int, condition_dim: int, residual: str):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({site: Adapter(dim, bottleneck, condition_dim, residual)
                                                   for site in RESIDUAL_SITES}) for _ in range(blocks))


@dataclass(frozen=True)
class DualAdapterSpec:
    bottleneck: int = 64
    condition_dim: int = 0  # the image embedding's width; 0: unconditioned
    condition_lam: float = 1.0
    residual: str = "code"

    def __post_init__(self):
        if not 1 <= self.bottleneck <= 4096:
            raise InputError("bottleneck", f"{self.bottleneck}", "a width from 1 to 4096 (the authors' 64)")
        if self.residual not in RESIDUALS:
            raise InputError("adapter_residual", f"'{self.residual}'", f"one of {RESIDUALS}")
        if self.condition_dim < 0:
            raise InputError("image_embedding", f"width {self.condition_dim}", "0 (none) or a positive width")


class DualAdapterPart(ModulePart):
    """The identity or the motion adapters of every block, as a part (see the module's docstring). Only the motion
    adapters take an image embedding. `tensors` (an export's) load instead of seeded initial weights."""

    kind = ADAPTER_KIND

    def __init__(self, name: str, role: str, spec: DualAdapterSpec = DualAdapterSpec(), seed: int = 0,
                 tensors: Mapping[str, torch.Tensor] | None = None, base_model: dict | None = None):
        super().__init__(name)
        if role not in ROLES:
            raise InputError("role", f"'{role}'", f"one of {ROLES}")
        if role == "identity" and spec.condition_dim:
            raise InputError("image_embedding", "the identity adapters take no image embedding",
                             "conditioning on the motion adapters only")
        self.role, self.spec, self.seed = role, spec, seed
        self.tensors, self.base_model = tensors, base_model
        self.input_name = name  # what refusals of its loaded weights name (the file's input, where loaded from one)
        self.module: BlockAdapters | None = None
        self.backbone: WanBackbone | None = None
        self.scale: StrengthValue = 1.0
        self.block_weights: torch.Tensor | None = None  # [B or 1, blocks], set by a controller each forward
        self.condition: torch.Tensor | None = None

    # --- attaching -------------------------------------------------------------------------
    @classmethod
    def attach_together(cls, backbone: WanBackbone, parts, device, stack: contextlib.ExitStack) -> None:
        """One residual per block and site adds every attached adapter part's output (each at its weight)."""
        for part in parts:
            stack.enter_context(part._built(backbone, device))

        for b in range(backbone.num_blocks):
            for site in RESIDUAL_SITES:
                def residual(h, b=b, site=site):
                    outs = [o for o in (p._output(b, site, h) for p in parts) if o is not None]
                    return sum(outs) if outs else torch.zeros_like(h)

                stack.callback(backbone.add_residual(b, site, residual).remove)

    @contextlib.contextmanager
    def attach(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.attach_together(backbone, [self], device, stack)
            yield

    @contextlib.contextmanager
    def _built(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        if self.base_model is not None:
            check_base_model(self.base_model, backbone, self.input_name)
        self.module = self._module_for(backbone, device, lambda: self._build(backbone), self.tensors is not None)
        self.backbone = backbone
        try:
            yield
        finally:
            self.module = self.backbone = self.block_weights = self.condition = None

    def _build(self, backbone: WanBackbone) -> BlockAdapters:
        spec = self.spec
        module = built_unseeded(lambda: BlockAdapters(backbone.num_blocks, backbone.dim, spec.bottleneck,
                                                      spec.condition_dim, spec.residual))
        if self.tensors is None:
            # Identity and motion adapters of one seed draw from different streams, so they start apart.
            seeded_linear_init(module, torch.Generator().manual_seed(self.seed * len(ROLES) + ROLES.index(self.role)))
            with torch.no_grad():
                for adapters in module.blocks:
                    for adapter in adapters.values():
                        adapter.up.weight.zero_()
                        adapter.up.bias.zero_()
        else:
            _load(module, self.tensors, self.input_name)
        return module

    # --- running ---------------------------------------------------------------------------
    def set_condition(self, c: torch.Tensor | None) -> None:
        """The image embedding `[B or 1, D_img]` the motion adapters take in the forwards that follow (None: none)."""
        if c is not None:
            width = self.spec.condition_dim
            if not width:
                raise InputError("image_embedding", f"'{self.name}' takes no image embedding (trained without one)",
                                 "no image embedding")
            if c.ndim != 2 or c.shape[1] != width:
                raise InputError("image_embedding", f"shape {tuple(c.shape)}",
                                 f"[batch, {width}]: the width the adapters were trained with")
        self.condition = c

    def set_block_weights(self, weights: torch.Tensor | None) -> None:
        """A controller's weights `[B or 1, blocks]` for the forwards that follow (None: `FIXED_WEIGHT`)."""
        self.block_weights = weights

    def _weight(self, block: int, rows: int) -> torch.Tensor | float:
        scale = self.scale
        if isinstance(scale, torch.Tensor) and scale.ndim == 1:
            scale = scale[block]
        if self.block_weights is None:
            return scale * FIXED_WEIGHT
        w = self.block_weights[:, block]
        if w.shape[0] not in (1, rows):
            raise InputError("block weights", f"{w.shape[0]} rows for a batch of {rows}", "one row per batch row")
        return scale * w.view(-1, 1, 1)

    def _output(self, block: int, site: str, h: torch.Tensor) -> torch.Tensor | None:
        weight = self._weight(block, h.shape[0])
        if isinstance(weight, float) and weight == 0.0:
            return None  # off: not even computed
        adapter = self.module.blocks[block][site]
        c = self.condition
        if c is None and self.spec.condition_dim:
            raise InputError("image_embedding", f"'{self.name}' was trained with an image embedding and none was given",
                             f"an image embedding of width {self.spec.condition_dim} (e.g. a CLIP vision output)")
        if c is not None and c.shape[0] not in (1, h.shape[0]):
            raise InputError("image_embedding", f"{c.shape[0]} embeddings for a batch of {h.shape[0]}",
                             "one embedding, or one per batch row")
        dtype = adapter.down.weight.dtype
        out = adapter(h.to(dtype), None if c is None else c.to(h.device, dtype), self.spec.condition_lam)
        return weight * out

    def _apply_strength(self, value: StrengthValue) -> None:
        if isinstance(value, torch.Tensor) and value.ndim == 1 and self.backbone is not None \
                and value.shape[0] != self.backbone.num_blocks:
            raise InputError(f"{self.name} strength", f"{value.shape[0]} weights",
                             f"one weight per block ({self.backbone.num_blocks}) or one for all")
        self.scale = value

    def export(self) -> Exported:
        tensors = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return Exported(self.kind, tensors, {"role": self.role, "blocks": self.backbone.num_blocks,
                                             "base_model": base_model_signature(self.backbone),
                                             "spec": asdict(self.spec)})

    @classmethod
    def from_exported(cls, name: str, exported: Exported, input_name: str = "dualreal") -> "DualAdapterPart":
        if exported.kind != ADAPTER_KIND:
            raise InputError(input_name, f"a '{exported.kind}' where DualReal adapters belong", "DualReal adapters")
        meta = exported.metadata
        with described(input_name):
            part = cls(name, meta["role"], DualAdapterSpec(**meta["spec"]), tensors=exported.tensors,
                       base_model=meta["base_model"])
        part.input_name = input_name
        return part


@contextlib.contextmanager
def described(input_name: str) -> Iterator[None]:
    """Reading a file's description of its parts: a damaged one (edited, or cut short) is refused, naming the input."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(input_name, f"its description of the parts is damaged ({type(e).__name__}: {e})",
                         "a file written by Save DualReal") from e


def check_base_model(expected: dict, backbone: WanBackbone, input_name: str) -> None:
    """Refuse weights made for another model size (block count, width)."""
    here = base_model_signature(backbone)
    differs = [k for k in ("blocks", "dim") if expected.get(k) != here[k]]
    if differs:
        raise InputError(input_name, "made for a model with " + ", ".join(f"{k} {expected.get(k)}" for k in differs)
                         + ", and this one has " + ", ".join(f"{k} {here[k]}" for k in differs),
                         "DualReal weights trained on this model")


def _load(module: nn.Module, tensors: Mapping[str, torch.Tensor], input_name: str) -> None:
    own = module.state_dict()
    if set(own) != set(tensors) or any(tuple(own[k].shape) != tuple(tensors[k].shape) for k in own):
        raise InputError(input_name, "its tensors do not fit (other names or shapes)",
                         "weights written for this model size and these settings")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})


# --- files ---------------------------------------------------------------------------------
@dataclass
class DualRealWeights:
    """A trained DualReal: its parts in file form by role ("identity", "motion", and "controller" if any). The
    identity and motion parts are DualReal adapters, or the subject and motion LoRAs of a joint LoRA run (each
    with its spec and base model; see `joint_dualreal`)."""

    parts: dict[str, Exported]

    @property
    def metadata(self) -> dict:
        return {role: exported.metadata for role, exported in self.parts.items()}

    @property
    def condition_dim(self) -> int:
        """The width of the image embedding the motion part takes: 0 for none (always so for a LoRA pair)."""
        motion = self.parts["motion"]
        return motion.metadata["spec"]["condition_dim"] if motion.kind == ADAPTER_KIND else 0


def save_dualreal(path: str | os.PathLike, weights: DualRealWeights) -> Path:
    """One safetensors file (atomic): every part's tensors under `<role>.`, their metadata as JSON."""
    missing = [r for r in ROLES if r not in weights.parts]
    if missing:
        raise InputError("dualreal", f"no {' and no '.join(missing)} adapters", "identity and motion adapters")
    tensors = {f"{role}.{k}": v for role, exported in weights.parts.items() for k, v in exported.tensors.items()}
    meta = {"custvid.kind": FILE_KIND,
            "custvid.dualreal": {role: {"kind": e.kind, **e.metadata} for role, e in weights.parts.items()}}
    return save_safetensors(path, tensors, meta)


def load_dualreal(path: str | os.PathLike, input_name: str = "dualreal") -> DualRealWeights:
    tensors, meta = load_safetensors(path, input_name)
    if meta.get("custvid.kind") != FILE_KIND or "custvid.dualreal" not in meta:
        raise InputError(input_name, f"'{Path(path).name}' is not a DualReal file", "a file written by Save DualReal")
    parts = {}
    with described(input_name):
        for role, info in json.loads(meta["custvid.dualreal"]).items():
            info = dict(info)
            kind = info.pop("kind")
            parts[role] = Exported(kind, {k[len(role) + 1:]: v for k, v in tensors.items() if k.startswith(role + ".")},
                                   info)
    if any(r not in parts for r in ROLES):
        raise InputError(input_name, f"'{Path(path).name}' lacks adapters", "identity and motion adapters")
    return DualRealWeights(parts)
