"""DualReal's StageBlender controller: how much identity and how much motion each group of blocks gets, per step.

From the forward's own inputs (`WanBackbone.before_blocks`), before the first block runs: the `[text; video]` tokens
after their embeddings, max-pooled over the tokens -> `c = Linear(dim -> 512)`; the timestep embedding -> SiLU ->
Linear -> (shift, scale, gate); `f = LN(c) * (1 + scale) + shift`, `f = MLP(f) + gate * c`;
`w = sigmoid(Linear(128 -> n)(relu(Linear(512 -> 128)(relu(f)))))`, the last layer zero-initialised. With the
authors' code's weighting (`weighting="code"`, the default) the identity adapters of group g get `0.2 * w[g]` and
the motion adapters `0.2 - 0.2 * w[g]` (both 0.1 at initialisation); with the paper's (`"paper"`), `w[g]` and
`1 - w[g]` (0.5 each). Over two LoRAs trained jointly (`"loras"`), `2 * w[g]` and `2 - 2 * w[g]`: both 1.0, the
strength each LoRA is made for, at initialisation. Groups are `n` runs of consecutive blocks (block i is in group
`i * n // blocks`).

The weights are set on the weighed parts (the dual adapters, or two LoRAs) for that forward, one row per batch row
(the prompt and the unconditional pass of guidance differ), and stay in the autograd graph, so the controller learns
with every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterator

import torch
from torch import nn

from ..backbones.wan import NATIVE_PREFIX, EmbeddedInputs, WanBackbone
from ..errors import InputError
from .dualreal import ADAPTER_KIND, ROLES, DualAdapterPart, DualRealWeights, _load, check_base_model, described
from .lora import LORA_SUFFIXES, LoraPart, LoraSpec, base_model_signature, native_lora_modules
from .parts import (
    BlockWeighted,
    Exported,
    ModulePart,
    PartBase,
    StrengthValue,
    attached,
    built_unseeded,
    seeded_linear_init,
)

KIND = "stage_blender"
WEIGHTINGS = ("code", "paper")  # over DualReal's adapters
LORA_WEIGHTING = "loras"  # over two jointly trained LoRAs
DEFAULT_GROUPS = 7
WIDTH, HIDDEN = 512, 128  # the authors' feature and fusion widths
CODE_SCALE = 0.2  # the code's identity + motion weight
TOTAL_WEIGHT = {"code": CODE_SCALE, "paper": 1.0, LORA_WEIGHTING: 2.0}  # identity + motion weight, by weighting


def group_count(groups: int | None, blocks: int) -> int:
    """`groups`, or by default 7 (the block count where smaller); more groups than blocks are refused."""
    if groups is None:
        return min(DEFAULT_GROUPS, blocks)
    if not 1 <= groups <= blocks:
        raise InputError("groups", f"{groups} groups of blocks", f"1 to {blocks} (the model's block count)")
    return groups


def block_groups(groups: int, blocks: int) -> torch.Tensor:
    """The group of each block: `groups` runs of consecutive blocks, as even as the counts allow."""
    return torch.arange(blocks) * groups // blocks


class StageBlender(nn.Module):
    def __init__(self, dim: int, time_dim: int, groups: int):
        super().__init__()
        self.tokens = nn.Linear(dim, WIDTH)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 3 * WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(approximate="tanh"), nn.Linear(4 * WIDTH, WIDTH))
        self.fuse = nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, groups))

    def forward(self, tokens: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """`[B, L, dim]` tokens, `[B, time_dim]` timestep embedding -> `[B, groups]` in (0, 1)."""
        shift, scale, gate = self.time(time).chunk(3, dim=1)
        c = self.tokens(tokens.max(dim=1).values)
        f = self.norm(c) * (1 + scale) + shift
        f = self.mlp(f) + gate * c
        return torch.sigmoid(self.fuse(f))


class StageBlenderPart(ModulePart):
    """The controller as a part: attached, it weighs `identity` and `motion` (attached parts: dual adapters, or the
    subject and motion LoRAs with `weighting="loras"`) in every forward. It adds nothing to the model itself, so its
    strength is not used; `tensors` load instead of seeded initial weights."""

    kind = KIND

    def __init__(self, name: str, identity: BlockWeighted, motion: BlockWeighted, groups: int | None = None,
                 weighting: str = "code", seed: int = 0, tensors: dict[str, torch.Tensor] | None = None,
                 base_model: dict | None = None):
        super().__init__(name)
        if weighting not in TOTAL_WEIGHT:
            raise InputError("weighting", f"'{weighting}'", f"one of {tuple(TOTAL_WEIGHT)}")
        self.identity, self.motion, self.groups_wanted, self.weighting, self.seed = identity, motion, groups, weighting, seed
        self.tensors, self.base_model = tensors, base_model
        self.input_name = name  # what refusals of its loaded weights name (the file's input, where loaded from one)
        self.module: StageBlender | None = None
        self.backbone: WanBackbone | None = None
        self.last_weights: torch.Tensor | None = None  # [B, groups]: the identity weights of the last forward

    @contextlib.contextmanager
    def attach(self, backbone: WanBackbone, device: torch.device | None) -> Iterator[None]:
        if self.base_model is not None:
            check_base_model(self.base_model, backbone, self.input_name)
        groups = group_count(self.groups_wanted, backbone.num_blocks)
        self.module = self._module_for(backbone, device, lambda: self._build(backbone, groups), self.tensors is not None)
        self.backbone = backbone
        self._of_block = block_groups(groups, backbone.num_blocks).to(device)
        try:
            with backbone.before_blocks(self._weigh):
                yield
        finally:
            for part in (self.identity, self.motion):
                part.set_block_weights(None)
            self.module = self.backbone = self.last_weights = None

    def _build(self, backbone: WanBackbone, groups: int) -> StageBlender:
        module = built_unseeded(lambda: StageBlender(backbone.dim, backbone.dim, groups))  # Wan's time embedding: dim
        if self.tensors is None:
            seeded_linear_init(module, torch.Generator().manual_seed(self.seed))
            with torch.no_grad():
                module.norm.reset_parameters()
                module.fuse[-1].weight.zero_()
                module.fuse[-1].bias.zero_()
        else:
            _load(module, self.tensors, self.input_name)
        return module

    def _weigh(self, inputs: EmbeddedInputs) -> None:
        param = self.module.tokens.weight
        tokens = torch.cat([inputs.text, inputs.video], dim=1).to(param)
        w = self.module(tokens, inputs.time.to(param))
        self.last_weights = w.detach()
        identity = w[:, self._of_block.to(w.device)]  # [B, blocks]
        total = TOTAL_WEIGHT[self.weighting]
        self.identity.set_block_weights(total * identity)
        self.motion.set_block_weights(total - total * identity)

    def identity_weights(self) -> torch.Tensor | None:
        """The identity adapters' weight per group `[B, groups]` in the last forward (motion: the rest)."""
        if self.last_weights is None:
            return None
        return TOTAL_WEIGHT[self.weighting] * self.last_weights

    def _apply_strength(self, value: StrengthValue) -> None:
        pass  # the controller weighs the adapters; it adds nothing itself

    def export(self) -> Exported:
        tensors = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return Exported(self.kind, tensors, {"groups": self.module.fuse[-1].out_features, "weighting": self.weighting,
                                             "blocks": self.backbone.num_blocks,
                                             "base_model": base_model_signature(self.backbone)})

    @classmethod
    def from_exported(cls, name: str, exported: Exported, identity: BlockWeighted, motion: BlockWeighted,
                      input_name: str = "dualreal") -> "StageBlenderPart":
        if exported.kind != KIND:
            raise InputError(input_name, f"a '{exported.kind}' where a StageBlender controller belongs",
                             "a StageBlender controller")
        meta = exported.metadata
        with described(input_name):
            part = cls(name, identity, motion, meta["groups"], meta["weighting"], tensors=exported.tensors,
                       base_model=meta["base_model"])
        part.input_name = input_name
        return part



def _lora_part(name: str, exported: Exported, input_name: str) -> LoraPart:
    """A LoRA export (a joint run's subject or motion LoRA) as a part, its tensors checked against its spec here so
    that a damaged file is refused where it is read, naming `input_name`."""
    with described(input_name):
        spec = replace(LoraSpec.from_dict(exported.metadata["spec"]), name=name)
        if not isinstance(exported.metadata["base_model"], dict):  # what `_fits`-style checks read
            raise TypeError("its base model is not described")
    modules = native_lora_modules(exported.tensors)
    missing = [key for module in sorted(modules) for key in (NATIVE_PREFIX + module + s for s in LORA_SUFFIXES)
               if key not in exported.tensors]
    if not modules or missing:
        problem = f"'{missing[0]}' is missing" if missing else "it holds no LoRA weights"
        raise InputError(input_name, f"its LoRA '{name}' is incomplete: {problem}", "a file written by Save DualReal")
    return LoraPart(spec, tensors=exported.tensors)


def dualreal_parts(weights: DualRealWeights, name: str = "dualreal", input_name: str = "dualreal") -> list[PartBase]:
    """Parts that apply a trained DualReal (`load_dualreal`'s, a run's `dualreal_weights` or a joint LoRA run's
    `joint_dualreal`): the identity and motion adapters, or the subject and motion LoRAs, and the controller that
    weighs them if it was trained with one."""
    kinds = {role: weights.parts[role].kind for role in ROLES}
    if kinds["identity"] != kinds["motion"] or kinds["identity"] not in (ADAPTER_KIND, LoraPart.kind):
        raise InputError(input_name, f"its identity and motion parts are of kinds {kinds['identity']!r} and "
                         f"{kinds['motion']!r}", "two DualReal adapters or two LoRAs, as Save DualReal writes them")
    loras = kinds["identity"] == LoraPart.kind
    if loras:
        identity, motion = (_lora_part(f"{name}_{role}", weights.parts[role], input_name) for role in ROLES)
    else:
        identity = DualAdapterPart.from_exported(f"{name}_identity", weights.parts["identity"], input_name)
        motion = DualAdapterPart.from_exported(f"{name}_motion", weights.parts["motion"], input_name)
        if identity.role != "identity" or motion.role != "motion":
            raise InputError(input_name, "its identity and motion adapters are swapped",
                             "a file written by Save DualReal")
    parts = [identity, motion]
    if "controller" in weights.parts:
        controller = StageBlenderPart.from_exported(f"{name}_controller", weights.parts["controller"], identity,
                                                    motion, input_name)
        if (controller.weighting == LORA_WEIGHTING) != loras:
            raise InputError(input_name, f"its controller weighs with '{controller.weighting}' over "
                             f"{'LoRAs' if loras else 'DualReal adapters'}",
                             f"'{LORA_WEIGHTING}' over LoRAs, one of {WEIGHTINGS} over adapters")
        parts.append(controller)
    return parts


def weights_over_steps(backbone: WanBackbone, parts: list[PartBase], noise: torch.Tensor, sigmas: torch.Tensor,
                       context: torch.Tensor, condition: torch.Tensor | None = None,
                       device: torch.device | None = None,
                       progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The identity weight the controller gives each group of blocks at each step `[steps, groups]` (DualReal's
    Figure 7), along a flow sampling run of a prompt: Euler steps on `sigmas` from `noise`, conditional only
    (`context` `[1, L, text_dim]`; `condition`: the motion adapters' image embedding). `parts`: `dualreal_parts`;
    `progress(done, total)` after each step."""
    controller = next((p for p in parts if isinstance(p, StageBlenderPart)), None)
    if controller is None:
        raise InputError("dualreal", "has no StageBlender controller (trained with fixed weights)",
                         "DualReal trained with its controller")
    rows = []
    x = noise.to(device)
    with torch.no_grad(), attached(backbone, parts, device):
        if condition is not None:  # a LoRA pair takes none
            controller.motion.set_condition(condition)
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            v = backbone.forward(x, torch.tensor([sigma], device=device), context.to(device))
            rows.append(controller.identity_weights()[0].float().cpu())
            x = x + (sigma_next - sigma) * v.to(x.dtype)
            if progress is not None:
                progress(len(rows), len(sigmas) - 1)
    return torch.stack(rows)
