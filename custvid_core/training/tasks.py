"""Tasks and phase schedules: what a recipe does at each training step, as data.

A `Task` is a named unit of a recipe (the subject's photos, preservation clips, stills, MotionDirector's
spatial frames, the motion clips...): it owns its loss, names the groups it trains, and the parts that are
off while it runs. A phase schedule says which task step `i` runs: `Cycle` (in turn, by the step index),
`Random` (by probability, drawing one number from the run's generator), `Stages` (one schedule for a number of
steps, then the next). Schedules nest, and every one sees the run's global step index, so a recipe keeps its
own rhythm inside a joint run. A `Recipe` gathers a recipe's parts, its schedule and what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from ..adapters.parts import Part
from ..backbones.wan import WanBackbone
from ..errors import InputError


@dataclass(frozen=True)
class StepContext:
    """What a task's loss needs besides the step's generator: the backbone, and where and in which dtype the
    data goes (the trainable parts stay fp32)."""

    backbone: WanBackbone
    device: torch.device
    dtype: torch.dtype


# loss(g, context) -> (loss, named loss terms for the log)
Loss = Callable[[torch.Generator, StepContext], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    loss: Loss
    trains: tuple[str, ...]  # the groups this task's steps update; the others get no gradient
    off: tuple[str, ...] = ()  # parts switched off (strength 0) while it runs


Schedule = Union[Task, "Cycle", "Random", "Stages"]


def task_at(schedule: Schedule, i: int, g: torch.Generator) -> Task:
    """The task that step `i` runs."""
    return schedule if isinstance(schedule, Task) else schedule.at(i, g)


def tasks_in(schedule: Schedule) -> Iterator[Task]:
    """Every task a schedule can run."""
    if isinstance(schedule, Task):
        yield schedule
    else:
        for entry in schedule.entries():
            yield from tasks_in(entry)


@dataclass(frozen=True)
class Cycle:
    """Step i runs `order[i % len(order)]`."""

    order: Sequence[Schedule]

    def at(self, i: int, g: torch.Generator) -> Task:
        return task_at(self.order[i % len(self.order)], i, g)

    def entries(self) -> Sequence[Schedule]:
        return self.order


@dataclass(frozen=True)
class Random:
    """Each step draws u uniform in [0, 1) from the run's generator and runs the first choice whose running
    sum of probabilities exceeds u (the last one if rounding leaves u past them all)."""

    choices: Sequence[tuple[float, Schedule]]

    def __post_init__(self):
        if any(p < 0 for p, _ in self.choices) or abs(sum(p for p, _ in self.choices) - 1.0) > 1e-6:
            raise InputError("probabilities", f"{[p for p, _ in self.choices]}", "probabilities that sum to 1")

    def at(self, i: int, g: torch.Generator) -> Task:
        u, total = float(torch.rand((), generator=g)), 0.0
        for p, entry in self.choices[:-1]:
            total += p
            if u < total:
                return task_at(entry, i, g)
        return task_at(self.choices[-1][1], i, g)

    def entries(self) -> Sequence[Schedule]:
        return [entry for _, entry in self.choices]


@dataclass(frozen=True)
class Stages:
    """`stages[k]` = (steps, schedule): each schedule for its number of steps in turn; the last one goes on."""

    stages: Sequence[tuple[int, Schedule]]

    def at(self, i: int, g: torch.Generator) -> Task:
        end = 0
        for steps, entry in self.stages[:-1]:
            end += steps
            if i < end:
                return task_at(entry, i, g)
        return task_at(self.stages[-1][1], i, g)

    def entries(self) -> Sequence[Schedule]:
        return [entry for _, entry in self.stages]


@dataclass
class Recipe:
    """A recipe's share of a run: the parts it attaches (in order; their groups keep that order), the schedule of
    its tasks, the parts it returns, and the parts that run only during its own tasks (throw-away helpers, a
    trigger embedding that fits only its own prompts), switched off while another recipe's task runs.
    `settings` and `data` identify it in a checkpoint's fingerprint."""

    name: str
    parts: list[Part]
    schedule: Schedule
    returns: tuple[str, ...]
    own_only: tuple[str, ...] = ()
    settings: Any = None
    data: Any = None
    main: str = field(default="")  # the part its convenience accessors mean; default: the first returned

    def __post_init__(self):
        self.main = self.main or self.returns[0]


def each_task(recipe: Recipe, change: Callable[[Task], Task]) -> Recipe:
    """`recipe` with every task of its schedule replaced by `change(task)` (e.g. also training a part of the run
    that learns on every step, such as a joint run's controller)."""
    return replace(recipe, schedule=_each_task(recipe.schedule, change))


def _each_task(schedule: Schedule, change: Callable[[Task], Task]) -> Schedule:
    if isinstance(schedule, Task):
        return change(schedule)
    if isinstance(schedule, Cycle):
        return Cycle([_each_task(s, change) for s in schedule.order])
    if isinstance(schedule, Random):
        return Random([(p, _each_task(s, change)) for p, s in schedule.choices])
    return Stages([(steps, _each_task(s, change)) for steps, s in schedule.stages])
