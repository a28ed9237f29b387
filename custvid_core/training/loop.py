"""The training loop every CustVid method shares.

A method supplies a step function (one batch -> loss) and named groups of trainable parameters
(an adapter, a projector, a controller, an embedding). The loop owns what users count on:
AdamW with warm-up and a cosine schedule, gradient clipping, a seed, loss and seconds per step,
atomic checkpoints every N steps that a rerun resumes on the same loss curve, a stop with a
clear message on NaN or divergence (the last good checkpoint is kept), and interruption through
the progress callback. A step may name the groups it updates: the others get no gradient and no
optimizer update that step (DualReal's gradient masks, MotionDirector's frozen spatial LoRA).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import SHOWN_MODULE, InputError
from ..files import atomic_path
from .distributed import (
    Session,
    accumulation_steps,
    clip_gradients,
    full_state,
    full_value,
    load_value,
    process_count,
    shard_optimizer_state,
)
from .fingerprint import settings_record

CHECKPOINT_FILE = "checkpoint.pt"
# The checkpoint of the run before, in the same folder: kept when a run of other data, settings or model starts
# there, so switching back resumes it.
PREVIOUS_CHECKPOINT_FILE = "checkpoint.previous.pt"
SCHEDULES = ("cosine", "constant")
# OptimSettings fields added since the first checkpoints (see `_fingerprint`).
LATER_SETTINGS = ("betas", "lr_factors")


@dataclass
class OptimSettings:
    steps: int = 300
    lr: float = 1e-4
    warmup: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    lr_factors: tuple[tuple[str, float], ...] = ()  # (group, factor): a group's learning rate is `factor * lr`
    seed: int = 0
    checkpoint_every: int = 100
    # A loss this many times the median of the last 50 steps counts as divergence.
    divergence_factor: float = 50.0

    def __post_init__(self):
        checks = (("steps", self.steps >= 1, "at least 1 step"),
                  ("learning_rate", 0 < self.lr < 1, "a learning rate between 0 and 1, e.g. 1e-4"),
                  ("warmup", 0 <= self.warmup, "0 or more warm-up steps"),
                  ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
                  ("grad_clip", self.grad_clip > 0, "a positive gradient norm, e.g. 1.0"),
                  ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
                  ("checkpoint_every", self.checkpoint_every >= 1, "at least 1 step"),
                  ("lr_factors", all(f > 0 for _, f in self.lr_factors), "positive learning-rate factors"))
        for name, ok, expected in checks:
            if not ok:
                raise InputError(name, f"{getattr(self, name if name != 'learning_rate' else 'lr')}", expected)

    def lr_at(self, step: int) -> float:
        if self.schedule == "constant" and step >= self.warmup:
            return self.lr
        return warmup_cosine(step, self.lr, self.warmup, self.steps, self.min_lr_ratio)


def warmup_steps(steps: int) -> int:
    """The warm-up a run of `steps` steps gets from the nodes and the world: a tenth of it, at most 20 steps."""
    return min(20, steps // 10)


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StepResult:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)  # named loss terms, for the log
    update: Iterable[str] | None = None  # groups updated this step; None: all


StepFn = Callable[[int, torch.Generator], StepResult]
# progress(step, total, record); may raise to interrupt (ComfyUI's ProgressBar does).
Progress = Callable[[int, int, dict], None]


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite or diverging loss; the last good checkpoint is kept."""


TrainingStopped.__module__ = SHOWN_MODULE


def _fingerprint(groups: dict[str, list[nn.Parameter]], settings: OptimSettings, about: dict | None) -> dict:
    """What a checkpoint must match to be resumed: the trained groups' shapes, the settings (all but the step
    count, so a rerun with more steps continues), and `about`'s data / model digests and recipe settings."""
    about = dict(about or {})
    # Settings added after checkpoints were first written count only when changed, so those checkpoints resume.
    defaults = OptimSettings()
    later = tuple(name for name in LATER_SETTINGS if getattr(settings, name) == getattr(defaults, name))
    record = {**settings_record(settings, leave_out=("steps", "checkpoint_every", *later)), **about.pop("settings", {})}
    return {"groups": {n: [list(p.shape) for p in ps] for n, ps in groups.items()}, "settings": record, **about}


def _differences(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in words."""
    what = [f"other {k}" for k in ("data", "model") if old.get(k) != new.get(k)]
    before, now = old.get("settings", {}), new["settings"]
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        what.append("other settings (" + ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "") + ")")
    elif old.get("groups") != new.get("groups"):
        what.append("other adapters")
    return ", ".join(what) or "another version of CustVid"


def train(step_fn: StepFn, groups: dict[str, list[nn.Parameter]], settings: OptimSettings,
          workdir: str | Path | None = None, progress: Progress | None = None,
          log: Callable[[str], None] | None = None, about: dict | None = None,
          blocks: Iterable[nn.Module] = ()) -> list[dict]:
    """Run `settings.steps` steps and return the loss history (one record per step).

    With `workdir`, a checkpoint there is resumed if it matches these groups and settings and `about`
    (digests of the data and the base model, `data` and `model`, and the recipe's `settings` as a dict),
    and one is written every `checkpoint_every` steps and at the end. A checkpoint of another run is kept
    aside (one, as `checkpoint.previous.pt`) and this run trains afresh; `log` says which happened.

    Every random draw of a step comes from the generator `step_fn` is given (seeded with `settings.seed` and
    checkpointed with the parameters), so a resumed run draws what the uninterrupted one would have.

    Under `accelerate launch` (or torchrun), and with its gradient accumulation, each process computes its share of
    every step's batch (`distributed`); only the main process writes, logs and reports progress. `blocks`: the
    model's transformer blocks, which the "fsdp" strategy shards (and puts back when the run ends).
    """
    if not groups or not any(groups.values()):
        raise InputError("adapters", "nothing to train", "at least one adapter or trainable module")
    params = [p for ps in groups.values() for p in ps]
    for p in params:
        p.requires_grad_(True)
    factors = dict(settings.lr_factors)
    if set(factors) - set(groups):
        raise InputError("lr_factors", f"unknown groups {sorted(set(factors) - set(groups))}", f"some of {list(groups)}")
    fingerprint = _fingerprint(groups, settings, about)
    accumulation = accumulation_steps()
    session = Session(params, step_fn, accumulation, list(blocks)) if process_count() > 1 or accumulation > 1 else None
    try:
        return _train(step_fn, groups, settings, workdir, progress, log, fingerprint, session)
    finally:
        if session is not None:
            session.close()


def _train(step_fn: StepFn, groups: dict[str, list[nn.Parameter]], settings: OptimSettings, workdir, progress, log,
           fingerprint: dict, session: Session | None) -> list[dict]:
    if session is not None:  # under FSDP, the parameters inside the blocks are trained as their shards
        groups = {n: [session.trained(p) for p in ps] for n, ps in groups.items()}
    params = [p for ps in groups.values() for p in ps]
    factors = dict(settings.lr_factors)
    opt = torch.optim.AdamW([{"params": ps, "name": n,
                              "weight_decay": settings.weight_decay} for n, ps in groups.items() if ps],
                            lr=settings.lr, betas=tuple(settings.betas))
    g = torch.Generator().manual_seed(settings.seed)
    main = session is None or session.is_main
    log = log if main else None
    history: list[dict] = []
    start = 0
    ckpt_path = Path(workdir) / CHECKPOINT_FILE if workdir is not None else None
    with session.main_first() if session else contextlib.nullcontext():  # the main process sets a stale one aside
        state = _matching_checkpoint(Path(workdir), fingerprint, log or (lambda m: None)) if ckpt_path else None
    if state is not None:
        start, history = _resume(state, groups, opt, g)
        if log:
            log(f"already trained ({start} steps)" if start >= settings.steps
                else f"resumed from step {start} of {settings.steps}")

    def save(step: int):
        if ckpt_path is None:
            return
        # Whole values, gathered from the shards by every process under FSDP, so any process count resumes it.
        params, optimizer = {n: [full_value(p).cpu() for p in ps] for n, ps in groups.items()}, full_state(opt.state_dict())
        if main:
            state = {"fingerprint": fingerprint, "step": step, "history": history, "params": params,
                     "optimizer": optimizer, "generator": g.get_state()}
            with atomic_path(ckpt_path) as tmp:
                torch.save(state, tmp)
        if session is not None:  # the others wait for the file
            session.wait()

    for step in range(start, settings.steps):
        t0 = time.perf_counter()
        lr = settings.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr * factors.get(group["name"], 1.0)
        opt.zero_grad(set_to_none=True)
        result, value, parts = session.forward_backward(step, g) if session else _forward_backward(step_fn, step, g)
        recent = [r["loss"] for r in history[-50:]]
        diverged = len(recent) >= 10 and value > settings.divergence_factor * max(statistics.median(recent), 1e-8)
        if not math.isfinite(value) or diverged:
            last = (step // settings.checkpoint_every) * settings.checkpoint_every if ckpt_path else 0
            what = "became " + str(value) if not math.isfinite(value) else f"jumped to {value:.4g}"
            raise TrainingStopped(f"the loss {what} at step {step + 1}; stopped. Try a lower learning rate"
                                  + (f"; the checkpoint of step {last} is kept" if ckpt_path and last else ""))
        if result.update is not None:
            keep = set(result.update)
            unknown = keep - set(groups)
            if unknown:
                raise InputError("update", f"unknown groups {sorted(unknown)}", f"some of {list(groups)}")
            for name, ps in groups.items():
                if name not in keep:
                    for p in ps:
                        p.grad = None  # AdamW skips parameters without a gradient
        with_grad = [p for p in params if p.grad is not None]
        norm = float(clip_gradients(with_grad, settings.grad_clip)) if with_grad else 0.0
        if not math.isfinite(norm):
            raise TrainingStopped(f"the gradient became {norm} at step {step + 1}; stopped. Try a lower learning rate")
        opt.step()
        record = {"step": step + 1, "loss": value, "lr": lr, "grad_norm": norm,
                  "seconds": time.perf_counter() - t0, **parts}
        history.append(record)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save(step + 1)
        if progress is not None and main:  # after the checkpoint: an interrupt here loses no finished step
            progress(step + 1, settings.steps, record)
    return history


def _forward_backward(step_fn: StepFn, step: int, g: torch.Generator) -> tuple[StepResult, float, dict]:
    result = step_fn(step, g)
    result.loss.backward()
    return result, float(result.loss.detach()), result.parts


def _read_checkpoint(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    except Exception:  # damaged, or not written by CustVid: not resumable
        return {}


def _matching_checkpoint(workdir: Path, fingerprint: dict, log: Callable[[str], None]) -> dict | None:
    """The checkpoint in `workdir` written by this run (same data, model and settings), or None to train afresh.
    A checkpoint of another run there is kept as the previous one; the run before it is dropped."""
    current, previous = workdir / CHECKPOINT_FILE, workdir / PREVIOUS_CHECKPOINT_FILE
    state = _read_checkpoint(current)
    if state is None or state.get("fingerprint") == fingerprint:
        return state
    kept = _read_checkpoint(previous)
    if kept and kept.get("fingerprint") == fingerprint:  # switched back to the run before: swap the two
        swap = workdir / f".{CHECKPOINT_FILE}.swap"
        os.replace(current, swap)
        os.replace(previous, current)
        os.replace(swap, previous)
        return kept
    why = _differences(state.get("fingerprint") or {}, fingerprint) if state else "an unreadable checkpoint"
    os.replace(current, previous)
    log(f"trained afresh: '{workdir}' held a checkpoint of another run ({why}); "
        f"it is kept as {PREVIOUS_CHECKPOINT_FILE}")
    return None


def _resume(state: dict, groups, opt, g) -> tuple[int, list[dict]]:
    with torch.no_grad():
        for name, ps in groups.items():
            for p, saved in zip(ps, state["params"][name]):
                load_value(p, saved)
    opt.load_state_dict(state["optimizer"])
    shard_optimizer_state(opt)
    g.set_state(state["generator"])
    return int(state["step"]), list(state["history"])
