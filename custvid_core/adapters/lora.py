"""LoRA adapters on a Wan backbone's roles, through peft, saved in ComfyUI's native LoRA form.

Several named adapters can sit on one backbone (SMRABooth's subject and motion LoRAs share
`ffn.0`); each has its own strength, which can change between sampling steps. `LoraPart` is a LoRA as
a training part (`parts.Part`); the LoRA parts of a run share one `LoraAdapters`. peft supplies the
LoRA layers; this module chooses their targets by role, exports and imports them under the names
ComfyUI's stock `LoraLoaderModelOnly` reads (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
`.lora_up.weight`, `.alpha`), and removes them again without a trace, because inside ComfyUI the
module tree belongs to a model that other graph nodes share.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..backbones.wan import NATIVE_PREFIX, ROLES, WanBackbone
from ..errors import InputError
from .parts import Exported, PartBase

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class LoraSpec:
    """Where an adapter goes and how big it is. `blocks=None` means every block."""

    name: str
    roles: tuple[str, ...]
    rank: int
    alpha: float | None = None  # None: alpha = rank, i.e. scale 1
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise InputError("adapter name", f"'{self.name}'", "letters, digits and underscores, e.g. 'subject'")
        if not self.roles:
            raise InputError(f"{self.name} roles", "no roles were given", f"some of {ROLES}")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise InputError(f"{self.name} roles", f"{bad} are not Wan block roles", f"some of {ROLES}")
        if not 1 <= self.rank <= 1024:
            raise InputError(f"{self.name} rank", f"{self.rank}", "a rank from 1 to 1024")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(d["name"], tuple(d["roles"]), int(d["rank"]), d.get("alpha"),
                   tuple(d["blocks"]) if d.get("blocks") is not None else None)


# SMRABooth's split by location: appearance in q/k and the first FFN layer, motion in v/o and the FFN.
SUBJECT_ROLES = ("self_attn.q", "self_attn.k", "cross_attn.q", "cross_attn.k", "ffn.0")
MOTION_ROLES = ("self_attn.v", "self_attn.o", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
# SynMotion's motion adapters: the query, key and value of every attention layer, self and cross.
SYNMOTION_MOTION_ROLES = ("self_attn.q", "self_attn.k", "self_attn.v", "cross_attn.q", "cross_attn.k", "cross_attn.v")


def subject_lora(rank: int = 32, name: str = "subject") -> LoraSpec:
    return LoraSpec(name, SUBJECT_ROLES, rank)


def motion_lora(rank: int = 64, name: str = "motion") -> LoraSpec:
    return LoraSpec(name, MOTION_ROLES, rank)


def synmotion_motion_lora(rank: int = 64, name: str = "motion") -> LoraSpec:
    """SynMotion's motion adapters. The paper gives no rank: 64, the pack's motion LoRA's, on as many roles
    (six), so the two motion recipes compare at the same size."""
    return LoraSpec(name, SYNMOTION_MOTION_ROLES, rank)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def _linear_like_types(backbone: WanBackbone, targets: Iterable[str]) -> dict[type, type]:
    """Target layers that are linear maps without subclassing nn.Linear (a host's quantized linear, such as
    ComfyUI's for scaled-fp8 files) -> peft's LoRA Linear, which only needs their `in_features`,
    `out_features` and forward."""
    from peft.tuners.lora import Linear

    modules = [backbone.model.get_submodule(t) for t in targets]
    return {type(m): Linear for m in modules
            if not isinstance(m, nn.Linear) and hasattr(m, "in_features") and hasattr(m, "out_features")}


class LoraAdapters:
    """peft LoRA layers attached to a backbone by role. Use as a context manager, or call `detach()`.

    While attached, the base weights are frozen; `detach()` puts the original modules back and
    restores their `requires_grad` flags.
    """

    def __init__(self, backbone: WanBackbone, specs: Iterable[LoraSpec], seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.backbone = backbone
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise InputError("adapters", "no adapter was given", "at least one LoRA spec")
        if any(True for _ in _lora_layers(backbone.model)):
            raise InputError("model", "the model already carries LoRA layers from another run",
                             "a model without attached adapters")
        self._requires_grad = {name: p.requires_grad for name, p in backbone.model.named_parameters()}
        self._weighing: dict[str, list] = {}  # adapter -> its output hooks, once a controller has weighed it
        self._targets: dict[str, dict[str, str]] = {}  # adapter -> module path -> native name
        block_of: dict[str, int] = {}
        self._had_peft_config = hasattr(backbone.model, "peft_config")
        try:
            # peft draws its initial weights from the global generator; they are drawn again below from the
            # adapters' own, so the global one is left as it was.
            with torch.random.fork_rng(devices=[]):
                for spec in self.specs.values():
                    blocks = range(backbone.num_blocks) if spec.blocks is None else spec.blocks
                    targets = {backbone.module_path(b, r): backbone.native_name(b, r) for b in blocks for r in spec.roles}
                    block_of.update({backbone.module_path(b, r): b for b in blocks for r in spec.roles})
                    self._targets[spec.name] = targets
                    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
                                        target_modules=list(targets), lora_dropout=0.0, bias="none")
                    config._register_custom_module(_linear_like_types(backbone, targets))
                    with warnings.catch_warnings():  # peft warns that a second adapter is one more adapter
                        warnings.simplefilter("ignore", UserWarning)
                        inject_adapter_in_model(config, backbone.model, adapter_name=spec.name)
        except Exception:
            self.detach()
            raise
        self._paths = dict(_lora_layers(backbone.model))
        # adapter -> (layer, block) for each layer it sits on, in the model's order
        self._layers = {name: [(layer, block_of[path]) for path, layer in self._paths.items() if name in layer.lora_A]
                        for name in self.specs}
        for layer in self._paths.values():
            layer.set_adapter(list(self.specs))  # every adapter active at once, all trainable
            for name in self.specs:
                if name in layer.lora_A:  # fp32 adapters, on the compute device even if the base is offloaded
                    layer.lora_A[name].to(device=device, dtype=dtype)
                    layer.lora_B[name].to(device=device, dtype=dtype)
        self._initialise(torch.Generator().manual_seed(seed))
        self.strengths: dict[str, float | torch.Tensor] = {name: 1.0 for name in self.specs}
        self.block_weights: dict[str, torch.Tensor | None] = dict.fromkeys(self.specs)

    def _initialise(self, g: torch.Generator) -> None:
        """Draw every `lora_A` as peft does (torch's nn.Linear default), from `g`, in peft's order: adapter by
        adapter, layer by layer, each layer building `lora_A` and `lora_B` (two draws) and then drawing
        `lora_A` again. `lora_B` stays zero, so each adapter starts as the identity."""

        def kaiming(shape) -> torch.Tensor:
            return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=g)

        with torch.no_grad():
            for name, layers in self._layers.items():
                for layer, _ in layers:
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                    kaiming(a.shape), kaiming(b.shape)  # what building the two layers drew
                    a.copy_(kaiming(a.shape))

    # --- parameters ------------------------------------------------------------------------
    def parameters(self, name: str) -> list[nn.Parameter]:
        self._check(name)
        return [p for layer in self._paths.values() if name in layer.lora_A
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def set_strength(self, name: str, strength: float | torch.Tensor) -> None:
        """Scale an adapter's contribution (1.0 = as trained): a float, or a tensor of one weight per block (or
        a 0-dim one), which may carry gradients into whatever set it. Cheap enough to call every sampling step."""
        self._check(name)
        before = self.strengths[name]
        if isinstance(strength, torch.Tensor):
            per_block = strength.ndim == 1
            if per_block and strength.shape[0] != self.backbone.num_blocks:
                raise InputError(f"{name} strength", f"{strength.shape[0]} weights",
                                 f"one weight per block ({self.backbone.num_blocks}) or one for all")
            for layer, block in self._layers[name]:
                layer.set_scale(name, strength[block] if per_block else strength)
        elif isinstance(before, torch.Tensor) or strength != before:
            for layer, _ in self._layers[name]:
                layer.set_scale(name, strength)
        self.strengths[name] = strength

    def set_block_weights(self, name: str, weights: torch.Tensor | None) -> None:
        """Weights `[B or 1, blocks]` (a controller's, one row per batch row, with gradients while training)
        multiplying the adapter's output in each block, on top of its strength, in the forwards that follow;
        None: none. A strength is one number per layer for the whole batch; these differ by batch row, so they
        scale the adapter's output (a hook on its up projection) rather than its scale."""
        self._check(name)
        if weights is not None and name not in self._weighing:
            self._weighing[name] = [layer.lora_B[name].register_forward_hook(partial(self._weighed, name, block))
                                    for layer, block in self._layers[name]]
        self.block_weights[name] = weights

    def _weighed(self, name: str, block: int, module, args, out: torch.Tensor) -> torch.Tensor | None:
        weights = self.block_weights[name]
        if weights is None:
            return None
        w = weights[:, block]
        if w.shape[0] not in (1, out.shape[0]):
            raise InputError("block weights", f"{w.shape[0]} rows for a batch of {out.shape[0]}",
                             "one row per batch row")
        return out * w.to(out.dtype).view(-1, *([1] * (out.ndim - 1)))

    @contextlib.contextmanager
    def strengths_set(self, **strengths: float) -> Iterator[None]:
        before = dict(self.strengths)
        try:
            for name, s in strengths.items():
                self.set_strength(name, s)
            yield
        finally:
            for name, s in before.items():
                self.set_strength(name, s)

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """Fold the adapters into the base weights at their current (float) strengths while inside (faster
        sampling when no strength changes between steps); unmerged on exit."""
        for layer in self._paths.values():
            layer.merge(adapter_names=[n for n in self.specs if n in layer.lora_A])
        try:
            yield
        finally:
            for layer in self._paths.values():
                layer.unmerge()

    # --- ComfyUI's LoRA form ---------------------------------------------------------------
    def native_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter as ComfyUI's stock loader reads it: `<native>.lora_down.weight [r, in]`,
        `.lora_up.weight [out, r]`, `.alpha` (scalar)."""
        spec = self.specs[self._check(name)]
        alpha = torch.tensor(float(spec.alpha if spec.alpha is not None else spec.rank))
        out = {}
        for path, native in self._targets[name].items():
            layer = self._paths[path]
            out[f"{native}.lora_down.weight"] = layer.lora_A[name].weight.detach().float().cpu().clone()
            out[f"{native}.lora_up.weight"] = layer.lora_B[name].weight.detach().float().cpu().clone()
            out[f"{native}.alpha"] = alpha.clone()  # safetensors refuses shared storage
        return out

    def load_native_state_dict(self, name: str, tensors: dict[str, torch.Tensor], input_name: str = "lora") -> None:
        """Load weights written by `native_state_dict` (or any LoRA with the same targets and rank)."""
        spec = self.specs[self._check(name)]
        expected = {f"{native}{suffix}" for native in self._targets[name].values() for suffix in LORA_SUFFIXES}
        missing = sorted(expected - set(tensors))
        if missing:
            raise InputError(input_name, f"the file lacks {len(missing)} of the adapter's weights, e.g. '{missing[0]}'",
                             f"a LoRA on roles {list(spec.roles)} of this model")
        with torch.no_grad():
            for path, native in self._targets[name].items():
                layer = self._paths[path]
                for key, param in ((".lora_down.weight", layer.lora_A[name].weight),
                                   (".lora_up.weight", layer.lora_B[name].weight)):
                    value = tensors[native + key]
                    if value.shape != param.shape:
                        raise InputError(input_name, f"'{native + key}' has shape {tuple(value.shape)}",
                                         f"shape {tuple(param.shape)} (rank {spec.rank} on this model size)")
                    param.copy_(value)
                alpha = float(tensors[native + ".alpha"])
                if abs(alpha / spec.rank - spec.scale) > 1e-6:
                    raise InputError(input_name, f"alpha {alpha} differs from the adapter's {spec.alpha or spec.rank}",
                                     "the same alpha the adapter was made with")

    # --- teardown --------------------------------------------------------------------------
    def detach(self) -> None:
        """Put the original linear layers back; the model is as it was before attaching."""
        for handles in self._weighing.values():
            for handle in handles:
                handle.remove()
        model = self.backbone.model
        for path, module in list(_lora_layers(model)):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.get_base_layer())
        if not self._had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
        for name, p in model.named_parameters():
            flag = self._requires_grad.get(name)
            if flag is not None and p.requires_grad != flag:
                # Weights loaded under inference mode (as hosts do) only take the flag back inside it.
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
        self._paths = {}

    def __enter__(self) -> "LoraAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _check(self, name: str) -> str:
        if name not in self.specs:
            raise InputError("adapter", f"'{name}' is not attached", f"one of {list(self.specs)}")
        return name


class LoraPart(PartBase):
    """A LoRA as a part. The LoRA parts of a run attach together, as one `LoraAdapters` (peft keeps several
    adapters on one layer), whose initial weights are drawn from their common seed; `tensors` (ComfyUI's native
    keys, an export's) load instead. A controller may weigh it per block and batch row (`set_block_weights`)."""

    kind = "lora"

    def __init__(self, spec: LoraSpec, seed: int = 0, tensors: Mapping[str, torch.Tensor] | None = None):
        super().__init__(spec.name)
        self.spec, self.seed, self.tensors = spec, seed, tensors
        self.adapters: LoraAdapters | None = None

    @classmethod
    def attach_together(cls, backbone: WanBackbone, parts, device, stack: contextlib.ExitStack) -> None:
        seeds = {p.seed for p in parts}
        if len(seeds) > 1:
            raise InputError("seed", f"LoRA parts with seeds {sorted(seeds)}", "one seed for the LoRAs of a run")
        adapters = stack.enter_context(LoraAdapters(backbone, [p.spec for p in parts], seed=seeds.pop(), device=device))
        for p in parts:
            if p.tensors is not None:
                adapters.load_native_state_dict(p.name, dict(p.tensors), p.name)
            p.adapters = adapters
            stack.callback(setattr, p, "adapters", None)

    @contextlib.contextmanager
    def attach(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.attach_together(backbone, [self], device, stack)
            yield

    def _attached(self) -> LoraAdapters:
        if self.adapters is None:
            raise InputError("adapter", f"'{self.name}' is not attached", "an attached part")
        return self.adapters

    def groups(self) -> dict[str, list[nn.Parameter]]:
        return {self.name: self._attached().parameters(self.name)}

    def _apply_strength(self, value) -> None:
        self._attached().set_strength(self.name, value)

    def set_block_weights(self, weights: torch.Tensor | None) -> None:
        """A controller's weights `[B or 1, blocks]` on the LoRA's output for the forwards that follow (None: none;
        nothing to undo once detached)."""
        if self.adapters is not None:
            self.adapters.set_block_weights(self.name, weights)

    def export(self) -> Exported:
        """ComfyUI's native LoRA keys, and the spec."""
        return Exported(self.kind, self._attached().native_state_dict(self.name), {"spec": self.spec.to_dict()})


def native_lora_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The module names (without `diffusion_model.`) a native LoRA file patches."""
    return {k[len(NATIVE_PREFIX):-len(s)] for k in tensors for s in LORA_SUFFIXES
            if k.startswith(NATIVE_PREFIX) and k.endswith(s)}


def base_model_signature(backbone: WanBackbone) -> dict:
    """What a LoRA must match to load: block count and width (1.3B and 14B differ in both)."""
    return {"architecture": "wan", "blocks": backbone.num_blocks, "dim": backbone.dim, "text_dim": backbone.text_dim}


class LoraWeights(dict):
    """A LoRA's native tensors (`diffusion_model.blocks.N.<role>.lora_down.weight` -> tensor), which is all
    ComfyUI's LORA_MODEL holds and its stock nodes read, carrying beside them what the LoRA's file records:
    its spec, the base model it fits (`base_model_signature`) and the words it was trained with."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: LoraSpec | None = None,
                 base_model: dict | None = None, trigger_words: str = ""):
        super().__init__(tensors)
        self.spec, self.base_model, self.trigger_words = spec, base_model, trigger_words


def lora_metadata(tensors: dict[str, torch.Tensor], spec: LoraSpec | None = None, base_model: dict | None = None,
                  info: dict | None = None) -> dict:
    """A LoRA file's CustVid metadata: its spec and base model where known, and `info`; without a spec, the
    ranks and roles its tensors show."""
    meta = {}
    if spec is not None:
        meta["custvid.lora.spec"] = spec.to_dict()
    if base_model is not None:
        meta["custvid.lora.base_model"] = base_model
    if spec is None:
        ranks = sorted({int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")})
        roles = sorted({m.split(".", 2)[2] for m in native_lora_modules(tensors)})
        info = {"ranks": ranks, "roles": roles, **(info or {})}
    meta["custvid.lora.info"] = info or {}
    return meta


def save_lora(path, tensors: dict[str, torch.Tensor], spec: LoraSpec | None = None,
              backbone: WanBackbone | None = None, info: dict | None = None, trigger_words: str | None = None):
    """Write a LoRA's native tensors as a ComfyUI LoRA file (atomic), with `lora_metadata`. What is not given
    comes from the tensors where they are `LoraWeights` (spec, base model, trigger words); trigger words go
    into the info."""
    from ..files import save_safetensors

    spec = spec or getattr(tensors, "spec", None)
    base_model = base_model_signature(backbone) if backbone is not None else getattr(tensors, "base_model", None)
    words = trigger_words if trigger_words is not None else getattr(tensors, "trigger_words", "")
    info = {**({"trigger_words": words} if words else {}), **(info or {})}
    return save_safetensors(path, tensors, lora_metadata(tensors, spec, base_model, info))


def read_lora(path, input_name: str = "lora") -> tuple[dict[str, torch.Tensor], LoraSpec | None, dict]:
    """A LoRA file's tensors, its spec (None for files CustVid did not write) and its metadata."""
    import json

    from ..files import load_safetensors

    tensors, meta = load_safetensors(path, input_name)
    if not native_lora_modules(tensors):
        raise InputError(input_name, "the file holds no LoRA weights under ComfyUI's 'diffusion_model.' names",
                         "a Wan LoRA with '.lora_down.weight' / '.lora_up.weight' keys")
    spec = None
    if "custvid.lora.spec" in meta:
        spec = LoraSpec.from_dict(json.loads(meta["custvid.lora.spec"]))
    return tensors, spec, {k: json.loads(v) if k.startswith("custvid.") else v for k, v in meta.items()}


def native_lora_factors(tensors: dict[str, torch.Tensor],
                        input_name: str = "lora") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A native LoRA file's layers: module name (without `diffusion_model.`) -> (down `[r, in]`, up `[out, r]`,
    alpha / rank), the factors in fp32; a missing alpha means alpha = rank."""
    factors = {}
    for name in sorted(native_lora_modules(tensors)):
        module = NATIVE_PREFIX + name
        if module + ".lora_down.weight" not in tensors:
            continue
        if module + ".lora_up.weight" not in tensors:
            raise InputError(input_name, f"'{module}.lora_up.weight' is missing beside its down factor",
                             "a LoRA with an up and a down factor for every layer")
        down, up = tensors[module + ".lora_down.weight"], tensors[module + ".lora_up.weight"]
        alpha = float(tensors.get(module + ".alpha", torch.tensor(float(down.shape[0]))))
        factors[name] = (down.float(), up.float(), alpha / down.shape[0])
    return factors
