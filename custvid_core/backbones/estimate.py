"""How much device memory a LoRA training run on a Wan model needs, before trying it: the peak and its parts.

The public Wan sizes (`WAN_SIZES`, from the Wan team's configs) and a `TrainingSetup` (clip size, batch, recipe, rank,
base precision, memory savings) give a `MemoryEstimate`:
- weights: the base model's on the device (the blocks' linear weights in the base's precision, the rest in bf16,
  fp32 bases wholly in fp32), less the swapped blocks, plus the swapped blocks' copies in flight (the running
  block's and the prefetched one's);
- adapters_and_optimizer: the trained parts (LoRAs, the recipe's alignment projector) in fp32 with their gradients and
  AdamW's two moments: 16 bytes a parameter;
- activations: what the forward keeps for the backward pass plus the backward's working set, from per-token
  coefficients measured on small Wan models on a CPU (`ACTIVATION_BYTES_PER_TOKEN`; benchmarks/estimator_validation.py
  measures them and checks the estimate against measured peaks, docs/results.md);
- encoders: the text encoder (umT5-XXL) and the VAE, where they stay loaded while training.

What the activations are made of, per block and per token of a clip (tokens = latent frames x (height / 16) x
(width / 16) on the 8x-downsampling VAE): without checkpointing a block keeps its internals (`kept`, linear in the
width and the FFN width); a recomputed block keeps only its input (`input`); offloaded activations leave the device;
the backward pass then holds one block's recomputed internals and its gradients (`working`). A swapped block is
always recomputed. fp8 bases compute in bf16: each layer's weight is cast to bf16 as it runs, and autograd keeps the
cast weights of every block that is not recomputed (and so do fp32 bases, cast down under autocast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..adapters.lora import MOTION_ROLES, SUBJECT_ROLES
from ..errors import InputError
from .memory import MemorySettings
from .wan import WanBackbone

GIB = 2 ** 30
RECIPES = ("subject", "motion")
PRECISIONS = ("bf16", "fp8", "fp32")
WEIGHT_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}  # how the blocks' linear weights are stored


@dataclass(frozen=True)
class WanSize:
    """A Wan transformer's shape (the Wan team's config) and its VAE's downsampling."""

    name: str
    dim: int
    ffn_dim: int
    heads: int
    layers: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    experts: int = 1  # Wan 2.2 A14B: two of these (high and low noise); one trains and sits on the device at a time
    vae_params: int = 127_000_000  # Wan 2.1's VAE; Wan 2.2's (16x16 downsampling) is larger

    def block_linear_params(self) -> int:
        """The weights of one block's linear layers (what fp8 stores in 1 byte)."""
        d, f = self.dim, self.ffn_dim
        return 8 * d * d + 2 * d * f

    def block_params(self) -> int:
        d, f = self.dim, self.ffn_dim
        # biases of the 8 attention projections and the FFN, q/k RMS norms of both attentions, the cross-attention
        # norm (affine), the 6 x dim modulation table
        return self.block_linear_params() + 8 * d + f + d + 4 * d + 2 * d + 6 * d

    def other_params(self) -> int:
        """Everything outside the blocks: patch, text and time embeddings, the time projection and the head."""
        d = self.dim
        patch = math.prod(self.patch)
        return (self.in_channels * patch * d + d + self.text_dim * d + d + d * d + d + self.freq_dim * d + d + d * d + d
                + d * 6 * d + 6 * d + d * self.out_channels * patch + self.out_channels * patch + 2 * d)

    def params(self) -> int:
        return self.layers * self.block_params() + self.other_params()


WAN_SIZES: dict[str, WanSize] = {
    "wan2.1-1.3b": WanSize("wan2.1-1.3b", dim=1536, ffn_dim=8960, heads=12, layers=30),
    "wan2.1-14b": WanSize("wan2.1-14b", dim=5120, ffn_dim=13824, heads=40, layers=40),
    "wan2.2-5b": WanSize("wan2.2-5b", dim=3072, ffn_dim=14336, heads=24, layers=30, in_channels=48, out_channels=48,
                         vae_stride=(4, 16, 16), vae_params=705_000_000),
    "wan2.2-a14b": WanSize("wan2.2-a14b", dim=5120, ffn_dim=13824, heads=40, layers=40, experts=2),
}

# Bytes per token, at bf16 compute, as `a * dim + b * ffn_dim`, per recipe (their LoRA roles keep different inputs):
# `kept`, per block not recomputed; `working`, the backward pass's working set (one block's recomputed internals,
# the gradients, the loss and the alignment projector's activations); and `fixed`, bytes a run needs whatever its
# size. Fitted to measured peaks on a CPU (benchmarks/estimator_validation.py --fit, docs/results.md).
ACTIVATION_BYTES_PER_TOKEN = {
    "subject": {"kept": (49.33, 2.56), "working": (120.36, 7.05), "fixed": 124874459},
    "motion": {"kept": (60.82, 2.61), "working": (201.1, 15.94), "fixed": 102487154},
}
# What a recomputed block keeps: its input, the hidden states (`dim` values a token, in bf16).
INPUT_BYTES = 2
# The recipes' trained parts: LoRA roles (`adapters.lora`), the alignment projector (REPA's 2048 wide) and its output
# (DINOv2-L's 1024 features for SuRA; 2 flow components for MoRA), and the motion recipe's spatial LoRA (rank 32).
PROJECTOR_HIDDEN = 2048
PROJECTOR_OUT = {"subject": 1024, "motion": 2}
SPATIAL_RANK = 32
# umT5-XXL's encoder: 11.4 GB in bf16, 6.7 GB as fp8 (the files ComfyUI users load; beside an fp32 base, the bf16).
TEXT_ENCODER_BYTES = {"bf16": 11_360_000_000, "fp8": 6_740_000_000, "fp32": 11_360_000_000}
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
COMPUTE_BYTES = 2  # bf16
# What a card keeps beyond the parts: the CUDA context, cuBLAS's workspace and the allocator's slack. A round
# allowance, not measured here (no GPU).
RESERVE = GIB


@dataclass(frozen=True)
class TrainingSetup:
    """One LoRA training run: the model (a name in `WAN_SIZES`, or a `WanSize`), the clips (pixels; frames as Wan
    counts them, 1 + 4k), the recipe and what saves memory. `checkpointing`: gradient checkpointing (the train
    nodes' default), refined by `memory`."""

    size: str | WanSize
    height: int = 480
    width: int = 832
    frames: int = 33
    batch: int = 1
    recipe: str = "subject"
    rank: int = 32
    precision: str = "bf16"
    memory: MemorySettings = field(default_factory=MemorySettings)
    vae_and_text_loaded: bool = False
    checkpointing: bool = True

    def __post_init__(self):
        if isinstance(self.size, str) and self.size not in WAN_SIZES:
            raise InputError("model", f"'{self.size}'", f"one of {', '.join(WAN_SIZES)}")
        wan = self.wan
        grid = wan.vae_stride[1] * wan.patch[1]
        for name, value in (("height", self.height), ("width", self.width)):
            if value < grid or value % grid:
                raise InputError(name, f"{value} pixels", f"a positive multiple of {grid} for {wan.name}")
        if self.frames < 1 or (self.frames - 1) % wan.vae_stride[0]:
            raise InputError("frames", f"{self.frames}", f"1 + {wan.vae_stride[0]}k frames (1, 5, ..., 33, ..., 81)")
        if self.batch < 1:
            raise InputError("batch", f"{self.batch}", "1 or more")
        if self.recipe not in RECIPES:
            raise InputError("recipe", f"'{self.recipe}'", f"one of {', '.join(RECIPES)}")
        if self.rank < 1:
            raise InputError("rank", f"{self.rank}", "1 or more")
        if self.precision not in PRECISIONS:
            raise InputError("precision", f"'{self.precision}'", f"one of {', '.join(PRECISIONS)}")
        if self.memory.blocks_to_swap > wan.layers:
            raise InputError("blocks_to_swap", f"{self.memory.blocks_to_swap}", f"0 to {wan.layers} for {wan.name}")

    @property
    def wan(self) -> WanSize:
        return WAN_SIZES[self.size] if isinstance(self.size, str) else self.size

    def tokens(self) -> int:
        """Tokens of one item: latent frames x latent rows / patch x latent columns / patch."""
        wan = self.wan
        t = (self.frames - 1) // wan.vae_stride[0] + 1
        return (t * (self.height // (wan.vae_stride[1] * wan.patch[1]))
                * (self.width // (wan.vae_stride[2] * wan.patch[2])))


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak device memory of a training step and its parts, in bytes."""

    setup: TrainingSetup
    weights: int
    adapters_and_optimizer: int
    activations: int
    encoders: int

    @property
    def peak(self) -> int:
        return self.weights + self.adapters_and_optimizer + self.activations + self.encoders

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "adapters_and_optimizer": self.adapters_and_optimizer,
                "activations": self.activations, "encoders": self.encoders, "peak": self.peak}

    def fits(self, gib: float) -> tuple[bool, str]:
        """Whether the peak fits a card of `gib` GiB with `RESERVE` left, and if not why: how much is missing and the
        largest part."""
        usable = gib * GIB - RESERVE
        if self.peak <= usable:
            return True, f"needs {self.peak / GIB:.1f} of {gib:g} GiB ({RESERVE / GIB:g} GiB kept for CUDA)"
        parts = {k: v for k, v in self.parts().items() if k != "peak"}
        largest = max(parts, key=parts.get)
        return False, (f"needs {self.peak / GIB:.1f} GiB, {(self.peak - usable) / GIB:.1f} more than {gib:g} GiB "
                       f"leaves after {RESERVE / GIB:g} GiB for CUDA; the largest part is "
                       f"{largest.replace('_', ' ')} ({parts[largest] / GIB:.1f} GiB)")


def _lora_params(wan: WanSize, roles: tuple[str, ...], rank: int) -> int:
    d, f = wan.dim, wan.ffn_dim
    sizes = {"ffn.0": d + f, "ffn.2": f + d}
    return wan.layers * sum(rank * sizes.get(role, 2 * d) for role in roles)


def adapter_params(setup: TrainingSetup) -> int:
    """The trained parameters: the recipe's LoRA(s) and its alignment projector."""
    wan, recipe = setup.wan, setup.recipe
    h = PROJECTOR_HIDDEN
    projector = wan.dim * h + h + h * h + h + h * PROJECTOR_OUT[recipe] + PROJECTOR_OUT[recipe]
    if recipe == "subject":
        return _lora_params(wan, SUBJECT_ROLES, setup.rank) + projector
    return _lora_params(wan, MOTION_ROLES, setup.rank) + _lora_params(wan, SUBJECT_ROLES, SPATIAL_RANK) + projector


def _per_token(kind: str, recipe: str, wan: WanSize) -> float:
    a, b = ACTIVATION_BYTES_PER_TOKEN[recipe][kind]
    return a * wan.dim + b * wan.ffn_dim


def recomputed_blocks(setup: TrainingSetup) -> set[int]:
    """The blocks whose forward runs again in the backward pass (keeping only their input): every k-th block under
    checkpointing, and the swapped ones."""
    layers, memory = setup.wan.layers, setup.memory
    every = {i for i in range(layers) if setup.checkpointing and i % memory.recompute_every == 0}
    return every | set(range(layers - memory.blocks_to_swap, layers))


def estimate(setup: TrainingSetup) -> MemoryEstimate:
    """The peak device memory of one training step of `setup` and its parts."""
    wan, memory = setup.wan, setup.memory
    linear_bytes = WEIGHT_BYTES[setup.precision]
    other_bytes = max(linear_bytes, COMPUTE_BYTES)
    block_bytes = (wan.block_linear_params() * linear_bytes
                   + (wan.block_params() - wan.block_linear_params()) * other_bytes)
    swapped = memory.blocks_to_swap
    in_flight = min(swapped, 2)  # the running block's copy and the next one's, prefetched
    weights = wan.other_params() * other_bytes + (wan.layers - swapped + in_flight) * block_bytes

    tokens = setup.tokens() * setup.batch
    recomputed = recomputed_blocks(setup)
    # one block's linear weights cast to bf16 as they run, where they are stored otherwise
    cast_weights = wan.block_linear_params() * COMPUTE_BYTES if linear_bytes != COMPUTE_BYTES else 0
    kept = 0.0
    if not memory.offload_activations:
        whole = wan.layers - len(recomputed)
        kept = (len(recomputed) * tokens * wan.dim * INPUT_BYTES
                + whole * (tokens * _per_token("kept", setup.recipe, wan) + cast_weights))
    activations = (kept + tokens * _per_token("working", setup.recipe, wan) + cast_weights
                   + ACTIVATION_BYTES_PER_TOKEN[setup.recipe]["fixed"])

    encoders = 0
    if setup.vae_and_text_loaded:
        encoders = TEXT_ENCODER_BYTES[setup.precision] + wan.vae_params * COMPUTE_BYTES
    return MemoryEstimate(setup, int(weights), adapter_params(setup) * ADAPTER_BYTES_PER_PARAM, int(activations),
                          encoders)



def table(e: MemoryEstimate) -> str:
    """The estimate as a text table of its parts in GiB (MiB under 1 GiB), headed by what it is for."""
    s, m = e.setup, e.setup.memory
    checkpointing = f"every {m.recompute_every} block(s)" if s.checkpointing else "off"
    lines = [f"{s.wan.name}, {s.height}x{s.width} x {s.frames} frames ({s.tokens()} tokens) x batch {s.batch}, "
             f"{s.recipe} recipe, rank {s.rank}, {s.precision} weights",
             f"checkpointing {checkpointing}, activations offloaded: {'yes' if m.offload_activations else 'no'}, "
             f"blocks swapped: {m.blocks_to_swap}, VAE and text encoder loaded: {'yes' if s.vae_and_text_loaded else 'no'}",
             ""]
    names = {"weights": "weights", "adapters_and_optimizer": "adapters + optimizer", "activations": "activations",
             "encoders": "VAE + text encoder", "peak": "peak"}
    unit, size = ("GiB", GIB) if e.peak >= GIB else ("MiB", 2 ** 20)  # small models (the shapes world) in MiB
    lines += [f"{names[k]:<22}{v / size:>8.2f} {unit}" for k, v in e.parts().items()]
    return "\n".join(lines)


# What the README's table tries, fastest first (checkpointing's and offloading's time ratios: docs/results.md); the
# first that fits a card is shown, block swap with the fewest blocks that fit.
LADDER = (
    ("bf16, no checkpointing", "bf16", False, MemorySettings()),
    ("bf16, every 2nd block recomputed", "bf16", True, MemorySettings(recompute_every=2)),
    ("bf16, checkpointing", "bf16", True, MemorySettings()),
    ("fp8, checkpointing", "fp8", True, MemorySettings()),
    ("fp8, checkpointing, activations offloaded", "fp8", True, MemorySettings(offload_activations=True)),
)


def cheapest_fit(size: str, frames: int, gib: float, recipe: str = "subject", rank: int = 32,
                 height: int = 480, width: int = 832) -> str:
    """The fastest setting of `LADDER` (then with blocks swapped) whose estimate fits `gib` GiB, or "does not fit"."""
    for name, precision, checkpointing, memory in LADDER:
        setup = TrainingSetup(size, height, width, frames, recipe=recipe, rank=rank, precision=precision,
                              memory=memory, checkpointing=checkpointing)
        e = estimate(setup)
        if e.fits(gib)[0]:
            return f"{name} ({e.peak / GIB:.1f})"
    for n in range(1, WAN_SIZES[size].layers + 1):
        e = estimate(TrainingSetup(size, height, width, frames, recipe=recipe, rank=rank, precision="fp8",
                                   memory=MemorySettings(offload_activations=True, blocks_to_swap=n)))
        if e.fits(gib)[0]:
            return f"fp8, offloaded, {n} blocks swapped ({e.peak / GIB:.1f})"
    return "does not fit"


def fit_table(cards: tuple[float, ...] = (12, 16, 24, 48, 80), frames: tuple[int, ...] = (33, 81),
              recipe: str = "subject", rank: int = 32) -> str:
    """A markdown table: for each Wan size and clip length at 480x832, the fastest setting that fits each card."""
    lines = ["| model | frames | " + " | ".join(f"{g:g} GB" for g in cards) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cards) + " |"]
    for size in WAN_SIZES:
        for f in frames:
            lines.append(f"| {size} | {f} | " + " | ".join(cheapest_fit(size, f, g, recipe, rank) for g in cards) + " |")
    return "\n".join(lines)


def size_of(backbone: WanBackbone) -> WanSize:
    """The shape of a loaded Wan (either implementation), with the latent grid as its clip size: a setup made with it
    takes the latents' frames, height and width (`latent_setup`)."""
    first_ffn = backbone.role_module(0, "ffn.0")
    patch = backbone.model.get_submodule(backbone.patch_embedding_path)
    return WanSize(f"the connected Wan ({backbone.num_blocks} blocks, {backbone.dim} wide; sizes in latent cells)",
                   dim=backbone.dim, ffn_dim=first_ffn.out_features, heads=backbone.cross_attention(0)[2],
                   layers=backbone.num_blocks, in_channels=patch.in_channels, out_channels=patch.in_channels,
                   patch=tuple(backbone.patch_size), vae_stride=(1, 1, 1), text_dim=backbone.text_dim)


def stored_precision(backbone: WanBackbone) -> str:
    """How the blocks' linear weights are stored, as `WEIGHT_BYTES` names it by its size (fp16 counts as bf16)."""
    size = backbone.role_module(0, "self_attn.q").weight.element_size()
    return next(name for name, n in WEIGHT_BYTES.items() if n == size)


def latent_setup(wan: WanSize, latent_shape: tuple[int, ...], **settings) -> TrainingSetup:
    """A setup for items of latents `[..., T, h, w]` on a `size_of` model (its clip size in latent cells)."""
    t, h, w = (int(x) for x in latent_shape[-3:])
    grid = wan.patch[1]
    return TrainingSetup(wan, height=-(-h // grid) * grid, width=-(-w // grid) * grid, frames=t, **settings)
