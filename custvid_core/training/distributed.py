"""Training on several processes (GPUs, machines) and with gradient accumulation, through accelerate.

Launch any training under `accelerate launch` (or `torchrun`): the loop then runs data parallel (PyTorch's DDP,
set up by accelerate's `Accelerator`), with accelerate's gradient accumulation steps (`accelerate launch
--gradient_accumulation_steps K`). Without a launcher and without accumulation the loop runs on its own, as it
always has.

Every process draws the step's whole batch (the recipe's `batch`, the global batch) from the run's shared seeded
generator and computes only its share of the rows (`own_rows`, called by the tasks after their draws), so the
global batch is the one-process run's. With K accumulation steps the batch is split into processes x K shares; a
process runs its K micro-batches one after another, the generator rewound to the step's start for each, so every
draw is the same. Gradients are averaged over the shares (DDP's all-reduce, accelerate's loss / K), which for
losses that are means over the batch rows gives the one-process gradient (the masked region loss weighs a share by
its part of the batch's mask, `objectives.region_loss`); the logged loss is the mean over the shares. A task that
draws a single row (SynMotion's) computes it on every process: correct, not faster. The trainable parts are
replicated on every process (DDP). With the "fsdp" strategy (`strategy_used`, the config's `[distributed]`), torch's
FSDP2 (`fully_shard`) shards each transformer block, its frozen weights and the LoRA layers inside it, across the
processes; the trainable parts outside the blocks (projector, trigger embedding) stay replicated under DDP. Either
way a checkpoint holds the full (gathered) adapters and optimizer state and resumes on any process count and
strategy, and the blocks are put back as they were (unsharded, the trained LoRA values in place) when the run ends.
Only the main process writes files, logs and shows progress; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import InputError

STRATEGIES = ("ddp", "fsdp")
_STRATEGY = contextvars.ContextVar("strategy", default="ddp")
# (this process's share of the step's batch, the number of shares); (0, 1): the whole batch.
_SHARE = contextvars.ContextVar("batch_share", default=(0, 1))


def accumulation_steps() -> int:
    """The micro-batches per step `accelerate launch --gradient_accumulation_steps K` asked for (1 without it)."""
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if not steps.isdigit() or int(steps) < 1:
        raise InputError("gradient_accumulation_steps", f"'{steps}'", "1 (none) or more steps")
    return int(steps)


# Where launchers put the process count and this process's rank (torchrun; MPI, as accelerate's --cpu launches).
COUNT_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _launcher_value(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if n in os.environ), default)


def process_count() -> int:
    """The number of processes `accelerate launch` / `torchrun` started (1 without a launcher)."""
    return _launcher_value(COUNT_VARIABLES, 1)


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0; the only process without a launcher)."""
    return _launcher_value(RANK_VARIABLES, 0) == 0


def end_processes() -> None:
    """After a finished run under a launcher: wait for every process, then close the process group, so that no
    process exits while another's communication threads still reach it (gloo aborts the late one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def process_device() -> torch.device:
    """The device this process trains on by default: its own GPU under a launcher (cuda:LOCAL_RANK), the first GPU
    without one, the CPU on a machine without GPUs."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def strategy_used(strategy: str) -> Iterator[None]:
    """Runs started while inside share the work across processes by `strategy`: "ddp" (the default: every process
    holds the whole model) or "fsdp" (each transformer block sharded across the processes)."""
    if strategy not in STRATEGIES:
        raise InputError("strategy", f"'{strategy}'", f"one of {', '.join(STRATEGIES)}")
    token = _STRATEGY.set(strategy)
    try:
        yield
    finally:
        _STRATEGY.reset(token)


def sharding() -> bool:
    """Whether a run started now shards its blocks (the "fsdp" strategy on several processes)."""
    return _STRATEGY.get() == "fsdp" and process_count() > 1


def own_rows(*batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This process's rows (at this micro-batch) of each of a step's batch tensors, drawn whole; all rows when alone."""
    index, count = _SHARE.get()
    rows = len(batch[0])
    if rows % count:
        raise InputError("batch", f"{rows} rows cannot be shared by {count} (processes x gradient accumulation steps)",
                         f"a batch that is a multiple of {count}, or fewer processes or accumulation steps")
    size = rows // count
    return tuple(t[index * size:(index + 1) * size] for t in batch)


class _Trainable(nn.Module):
    """The trainable parameters as one module whose forward runs a step, so that DDP averages their gradients."""

    def __init__(self, params: list[nn.Parameter], step_fn: Callable):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.step_fn = step_fn

    def forward(self, step: int, g: torch.Generator):
        return self.step_fn(step, g)


# The hooks fully_shard registers on a block, removed when the block is put back.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called")


class _ShardedBlocks:
    """fully_shard on each block, undone by `restore`: each block's own class, hooks and parameter objects back,
    holding the full (trained) values. While sharded, the blocks' original parameters hold no memory."""

    def __init__(self, blocks: list[nn.Module]):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.blocks = [(b, type(b), {t: set(getattr(b, t)) for t in _HOOK_TABLES}, set(b.__dict__)) for b in blocks]
        self.places, self.shards = [], {}
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (process_count(),))
        for block in blocks:  # one by one: a block on the CPU comes to the GPU whole only while it is sharded
            places = [(m, name, p, p.device) for m in block.modules() for name, p in m._parameters.items() if p is not None]
            fully_shard(block, mesh=mesh, reshard_after_forward=True)  # each block is a root, kept whole otherwise
            for m, name, p, _ in places:
                self.shards[id(p)] = getattr(m, name)
                p.data = p.data.new_empty(0)  # the shard holds the values now
            self.places += places

    def restore(self) -> None:
        with torch.no_grad():
            for m, name, p, device in self.places:  # gathered by every process, one at a time
                p.data = full_value(self.shards[id(p)]).to(device)
                m._parameters[name] = p
        for block, cls, hooks, attributes in self.blocks:
            block.__class__ = cls
            for table in _HOOK_TABLES:
                for key in set(getattr(block, table)) - hooks[table]:
                    del getattr(block, table)[key]
            for key in set(block.__dict__) - attributes:
                del block.__dict__[key]


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t`: gathered from every process when it is a shard (a collective call), else `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def full_state(state: dict) -> dict:
    """An optimizer's `state_dict()` with every shard of its moments gathered whole; called by every process."""
    return {**state, "state": {i: {k: full_value(v) if isinstance(v, torch.Tensor) else v for k, v in moments.items()}
                               for i, moments in state["state"].items()}}


def load_value(p: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy a whole saved value into `p`, or into this process's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        p.copy_(distribute_tensor(saved.to(p.device, p.dtype), p.device_mesh, p.placements)
                if isinstance(p, DTensor) else saved)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's whole optimizer state: each sharded parameter's moments cut to its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, state in opt.state.items():
        if isinstance(p, DTensor):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` over `params`, some of them shards: the norm is over the whole gradients."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [p for p in params if not isinstance(p.grad, DTensor)]  # the same on every process (all-reduced)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    norms += [torch.nn.utils.get_total_norm([p.grad for p in whole]).to(norms[0].device)] if whole else []
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, whole):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


class Session:
    """One run's accelerate side: the prepared (DDP) trainable module, the sharded blocks (FSDP), the barrier, the
    main process."""

    def __init__(self, params: list[nn.Parameter], step_fn: Callable, accumulation: int, blocks: list[nn.Module] = ()):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            raise InputError("--use_fsdp", "accelerate's own FSDP (it would wrap the trainable parts, not the model)",
                             "a launch without --use_fsdp, and strategy = \"fsdp\" in the config's [distributed]")

        # A step may leave parts out of its graph (a task trains some groups, switches parts off). Without a GPU,
        # accelerate runs processes started by torchrun one by one unless told it is on CPUs.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accumulation,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.sharded = _ShardedBlocks(list(blocks)) if sharding() and blocks else None
        # DDP averages the gradients of the replicated parameters; FSDP those of the shards.
        replicated = [p for p in params if self.sharded is None or id(p) not in self.sharded.shards]
        self.module = _Trainable(replicated, step_fn)
        if replicated:
            self.module = self.accelerator.prepare_model(self.module, device_placement=False)
        self.accumulation = accumulation

    def trained(self, p: nn.Parameter) -> nn.Parameter:
        """The parameter training updates for `p`: its shard (a DTensor) where its block is sharded, else `p`."""
        return p if self.sharded is None else self.sharded.shards.get(id(p), p)

    def close(self) -> None:
        """Put the sharded blocks back as they were, with the trained values."""
        if self.sharded is not None:
            self.sharded.restore()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield

    def forward_backward(self, step: int, g: torch.Generator):
        """Run step `step` on this process's shares of its batch and leave the averaged gradients on the parameters;
        returns the last micro-batch's `StepResult`, the loss and the named terms averaged over all shares."""
        start = g.get_state()
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        losses, terms = [], []
        for micro in range(self.accumulation):
            g.set_state(start)
            share = _SHARE.set((micro * processes + rank, processes * self.accumulation))
            try:
                with self.accelerator.accumulate(self.module):
                    result = self.module(step, g)
                    self.accelerator.backward(result.loss)
            finally:
                _SHARE.reset(share)
            losses.append(float(result.loss.detach()))
            terms.append(result.parts)
        names = sorted(terms[0])
        local = torch.tensor([[loss, *(t[n] for n in names)] for loss, t in zip(losses, terms)], dtype=torch.float64)
        mean = self.accelerator.reduce(local.mean(0).to(self.accelerator.device), "mean").cpu().tolist()
        return result, mean[0], dict(zip(names, mean[1:]))
