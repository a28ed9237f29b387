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
draws a single row (SynMotion's) computes it on every process: correct, not faster. The model and the trainable
parts are replicated on every process (no FSDP), so a checkpoint holds the full adapters and optimizer state and
resumes on any process count. Only the main process writes files, logs and shows progress; the others wait at a
barrier.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import InputError

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


def process_device() -> torch.device:
    """The device this process trains on by default: its own GPU under a launcher (cuda:LOCAL_RANK), the first GPU
    without one, the CPU on a machine without GPUs."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


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


class Session:
    """One run's accelerate side: the prepared (DDP) trainable module, the barrier, the main process."""

    def __init__(self, params: list[nn.Parameter], step_fn: Callable, accumulation: int):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # A step may leave parts out of its graph (a task trains some groups, switches parts off). Without a GPU,
        # accelerate runs processes started by torchrun one by one unless told it is on CPUs.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accumulation,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.module = self.accelerator.prepare_model(_Trainable(params, step_fn), device_placement=False)
        self.accumulation = accumulation

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
