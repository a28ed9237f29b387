"""Trading time for device memory while training: gradient checkpointing of every or every k-th block, the saved
activations offloaded to the CPU, and block swap (some blocks' weights kept on an offload device and brought to
the compute device only while they run). None of these changes what is computed: the gradients are the same.

They act on a `WanBackbone`'s blocks by wrapping each block's forward on the instance (`WanBackbone.training_memory`),
so the same code serves ComfyUI's `WanModel` and diffusers' `WanTransformer3DModel`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class MemorySettings:
    """How a run saves device memory beyond gradient checkpointing's on/off (which the recipes' settings hold).

    `recompute_every`: with checkpointing, only every k-th block (0, k, 2k, ...) is recomputed in backward and the
    others keep their activations: faster than every block, more memory. `offload_activations`: what the blocks'
    forward keeps for backward goes to the CPU (as `torch.autograd.graph.save_on_cpu`, the weights left out) and
    comes back when backward needs it: under checkpointing, the checkpointed blocks' inputs; without it, every
    activation. `blocks_to_swap`: the last
    N blocks' weights live on `offload_device` and each comes to the compute device just before it runs (and before
    its recomputation in backward); a swapped block is always checkpointed, as otherwise backward would keep its
    weights on the device. Trainable parameters (adapters) never move."""

    recompute_every: int = 1
    offload_activations: bool = False
    blocks_to_swap: int = 0
    offload_device: str = "cpu"

    def __post_init__(self):
        if self.recompute_every < 1:
            raise InputError("recompute_every", f"{self.recompute_every}", "1 (every block) or more")
        if self.blocks_to_swap < 0:
            raise InputError("blocks_to_swap", f"{self.blocks_to_swap}", "0 (off) or more blocks")


@contextlib.contextmanager
def training_memory(blocks: nn.ModuleList, checkpointing: bool, memory: MemorySettings,
                    device: torch.device) -> Iterator[None]:
    """While inside, `blocks` run with `memory`'s savings (`checkpointing`: gradient checkpointing on); each block's
    forward is wrapped on the instance and restored on exit, and swapped weights go back where they were."""
    count = len(blocks)
    if memory.blocks_to_swap > count:
        raise InputError("blocks_to_swap", f"{memory.blocks_to_swap} blocks", f"0 to {count}, the model's block count")
    swapped = range(count - memory.blocks_to_swap, count)
    recomputed = {i for i in range(count) if checkpointing and i % memory.recompute_every == 0} | set(swapped)
    if not recomputed and not memory.offload_activations:
        yield
        return
    pin = device.type == "cuda" and torch.device(memory.offload_device).type == "cpu"
    wrapped = []
    with BlockSwap([blocks[i] for i in swapped], device, torch.device(memory.offload_device)) as swap:
        try:
            for i, block in enumerate(blocks):
                run = swap.running(block, block.forward) if i in swapped else block.forward
                block.forward = _wrapped(run, i in recomputed, memory.offload_activations, pin)
                wrapped.append(block)
            yield
        finally:
            for block in wrapped:
                del block.forward  # back to the class's forward


def _wrapped(run: Callable, recompute: bool, offload: bool, pin: bool) -> Callable:
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        # Around the checkpoint, so the checkpoint's saved inputs (the block's input) are what goes to the CPU.
        with _ActivationsOnCpu(pin) if offload else contextlib.nullcontext():
            if recompute:
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

    return forward


class _ActivationsOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """torch's `save_on_cpu` for what the forward computes: a saved weight (a parameter, or a view of one, as a
    linear layer saves it) stays where it is, as it stays alive there anyway and copying it would only cost time."""

    def __init__(self, pin_memory: bool):
        on_cpu = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)

        def pack(t: torch.Tensor):
            return t if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) else (on_cpu.pack_hook(t),)

        super().__init__(pack, lambda packed: on_cpu.unpack_hook(packed[0]) if isinstance(packed, tuple) else packed)


@dataclass
class _Held:
    """One frozen tensor of a swapped block: where it sits in its module, where it was on entry, and what the module
    holds between calls (the parameter itself, its data offloaded; or the offloaded buffer)."""

    module: nn.Module
    kind: str  # "_parameters" | "_buffers"
    name: str
    home: torch.device
    outside: torch.Tensor

    def put(self, t: torch.Tensor) -> None:
        getattr(self.module, self.kind)[self.name] = t


class BlockSwap:
    """Some blocks' frozen weights (every parameter that does not require grad, and the buffers) kept on an offload
    device, each block's brought to the compute device for the length of one call of its forward (`running`).

    The parameters keep their identity: on entry each one's data moves to the offload device, and while a block
    runs its modules hold device copies in their place, put back after; autograd saves the copies, never the
    offloaded originals. Where CUDA exists the offloaded weights are pinned and the next block's copy is made on a
    side stream while the current block computes; the next block is the following one in the order the calls go
    (forward: up the blocks; backward's recomputation: down)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, offload_device: torch.device):
        self.blocks = blocks
        self.device, self.offload_device = device, offload_device
        self.stream = torch.cuda.Stream(device) if blocks and device.type == "cuda" and offload_device != device else None
        self.held: dict[nn.Module, list[_Held]] = {}
        self.prefetched: tuple[nn.Module, list[torch.Tensor]] | None = None
        self.last: int | None = None
        self.direction = 1

    def __enter__(self) -> "BlockSwap":
        try:
            self._offload()
        except BaseException:  # e.g. out of memory while pinning: what moved goes back
            self.__exit__()
            raise
        return self

    def _offload(self) -> None:
        for block in self.blocks:
            held = self.held[block] = []
            for module in block.modules():
                for kind in ("_parameters", "_buffers"):
                    held += [_Held(module, kind, n, t.device, t) for n, t in getattr(module, kind).items()
                             if t is not None and not t.requires_grad]
            for h in held:
                offloaded = self._to(h.outside, self.offload_device)
                # Pinned, so the copies to the device run on the side stream: only what this moved (what a host
                # left on the CPU itself stays as it was) and plain tensors (not a host's quantized ones).
                if self.stream is not None and h.home != self.offload_device and offloaded.device.type == "cpu" \
                        and type(offloaded) is torch.Tensor:
                    offloaded = offloaded.pin_memory()
                self._hold(h, offloaded)

    def __exit__(self, *exc) -> None:
        self.prefetched = None
        for held in self.held.values():
            for h in held:
                self._hold(h, self._to(h.outside, h.home))

    @staticmethod
    def _hold(h: _Held, data: torch.Tensor) -> None:
        """Make the module hold `data` between calls: as the same parameter object, or as the buffer."""
        if h.kind == "_parameters":
            h.outside.data = data
        else:
            h.outside = data
            h.put(data)

    def _to(self, t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        """The one place a swapped tensor moves between devices."""
        return t.detach().to(device, non_blocking=non_blocking)

    def _copies(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's tensors on the compute device: the prefetched copies, or copied now."""
        if self.prefetched is not None and self.prefetched[0] is block:
            copies = self.prefetched[1]
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for c in copies:
                c.record_stream(current)  # made on the side stream, used and freed on this one
            return copies
        return [self._to(h.outside, self.device) for h in self.held[block]]

    def _prefetch_after(self, block: nn.Module) -> None:
        """Start copying the block the calls reach next, on the side stream (where there is one)."""
        i = self.blocks.index(block)
        if i == self.last:  # the same block twice: the calls turned round (forward into backward, or back)
            self.direction = -self.direction
        elif self.last is not None:
            self.direction = 1 if i > self.last else -1
        self.last = i
        self.prefetched = None
        following = i + self.direction
        if self.stream is None or not 0 <= following < len(self.blocks):
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        nxt = self.blocks[following]
        with torch.cuda.stream(self.stream):
            self.prefetched = (nxt, [self._to(h.outside, self.device, non_blocking=True) for h in self.held[nxt]])

    def running(self, block: nn.Module, forward: Callable) -> Callable:
        """`forward` with the block's frozen tensors on the compute device during the call only."""
        held = self.held[block]

        def run(*args, **kwargs):
            copies = self._copies(block)
            self._prefetch_after(block)
            for h, copy in zip(held, copies):
                h.put(nn.Parameter(copy, requires_grad=False) if h.kind == "_parameters" else copy)
            try:
                return forward(*args, **kwargs)
            finally:
                for h in held:
                    h.put(h.outside)

        return run
