"""The benchmark's customization methods, read from `methods.toml`: each is the method it starts from plus what it
changes, so a method is named once and its difference from its neighbour is what the file shows."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import tomllib

from ...backbones.wan import ROLES
from ...control.strength import SMRABOOTH_TIMING
from ...training.customize import MotionSettings, SubjectSettings
from ...training.dualreal import DualRealSettings
from ...training.loop import OptimSettings, warmup_steps
from ...training.objectives import SigmaSampler
from ..customize import LoraMethod
from ..dualreal import DualRealMethod
from ..synmotion import SynMotionMethod

METHODS_FILE = Path(__file__).with_name("methods.toml")
# Names the file uses for values too long to write there.
NAMED_ROLES = {"all": ROLES}
NAMED_SCHEDULES = {"smrabooth": SMRABOOTH_TIMING}


def world_optim(steps: int, lr: float) -> OptimSettings:
    """The optimiser of the world's methods: warm-up for a tenth of the steps (at most 20), one checkpoint at the end."""
    return OptimSettings(steps=steps, lr=lr, warmup=warmup_steps(steps), checkpoint_every=max(1, steps))


def method_names(path: str | Path = METHODS_FILE) -> list[str]:
    return list(tomllib.loads(Path(path).read_text()))


def _scaled(steps: int, fraction: str) -> int:
    f = Fraction(fraction)
    return steps * f.numerator // f.denominator


def bench_methods(steps: int = 300, lr: float = 1e-3, path: str | Path = METHODS_FILE) -> dict:
    """Every method of `path` (LoRA, DualReal and SynMotion) for a ladder of `steps` steps at learning rate `lr`, in
    the file's order."""
    methods = {**lora_methods(steps, lr, path=path), **dualreal_methods(steps, lr, path), **synmotion_methods(steps, lr, path)}
    return {name: methods[name] for name in method_names(path)}


def _methods_of_kind(kind: str, path: str | Path, start, optim) -> dict:
    """The methods of `path` with `kind = <kind>`: each its `from` method (or `start(name)`) with the fields its
    entry changes; the entry's `<kind>` table changes fields of the method's settings, `optim` (a fraction of the
    ladder's steps) gives the settings `optim(parent settings, steps)`."""
    table = tomllib.loads(Path(path).read_text())
    methods: dict = {}

    def build(name: str):
        if name not in methods:
            entry = dict(table[name])
            entry.pop("kind")
            parent = build(entry.pop("from")) if "from" in entry else start(name)
            settings = dict(entry.pop(kind, {}))
            if "sigmas" in settings:
                settings["sigmas"] = SigmaSampler(**settings["sigmas"])
            if "optim" in entry:
                settings["optim"] = optim(parent.settings, entry.pop("optim"))
            methods[name] = replace(parent, name=name, settings=replace(parent.settings, **settings), **entry)
        return methods[name]

    return {name: build(name) for name, entry in table.items() if entry.get("kind") == kind}


def dualreal_methods(steps: int = 300, lr: float = 1e-3, path: str | Path = METHODS_FILE) -> dict[str, DualRealMethod]:
    """The DualReal methods of `path` (`kind = "dualreal"`; `dualreal` changes fields of DualRealSettings, `optim`
    is the authors' optimiser (DualRealSettings') for that fraction of `steps`, at `lr`, one checkpoint at the end)."""

    def optim(settings: DualRealSettings, fraction: str) -> OptimSettings:
        n = _scaled(steps, fraction)
        return replace(DualRealSettings().optim, steps=n, lr=lr, checkpoint_every=n)

    methods = _methods_of_kind("dualreal", path, DualRealMethod, optim)
    return {name: replace(m, encoders={}) for name, m in methods.items()}


def synmotion_methods(steps: int = 300, lr: float = 1e-3, path: str | Path = METHODS_FILE) -> dict[str, SynMotionMethod]:
    """The SynMotion methods of `path` (`kind = "synmotion"`; `synmotion` changes fields of SynMotionSettings, `optim`
    is the world's optimiser (`world_optim`) for that fraction of `steps`, at `lr`; `subject` names the LoRA method
    whose subject LoRA and schedules the combined use takes)."""
    methods = _methods_of_kind("synmotion", path, SynMotionMethod,
                               lambda settings, fraction: world_optim(_scaled(steps, fraction), lr))
    loras = lora_methods(steps, lr, path=path)
    return {name: replace(m, subject=loras[m.subject]) if isinstance(m.subject, str) else m
            for name, m in methods.items()}


def lora_methods(steps: int = 300, lr: float = 1e-3, alignment_block: int = 1,
                 path: str | Path = METHODS_FILE) -> dict[str, LoraMethod]:
    """The LoRA methods of `path` for a ladder of `steps` training steps at learning rate `lr`, in the file's order;
    `alignment_block`: the block SuRA and MoRA align (for every method)."""
    table = {name: entry for name, entry in tomllib.loads(Path(path).read_text()).items() if "kind" not in entry}

    def scaled(fraction: str) -> int:
        return _scaled(steps, fraction)

    def changed(settings, changes: dict):
        values = dict(changes)
        if "optim" in values:
            optim = values["optim"]
            values["optim"] = world_optim(scaled(optim), lr) if isinstance(optim, str) else \
                replace(settings.optim, **{k: scaled(v) if k == "steps" else v for k, v in optim.items()})
        if "sigmas" in values:
            values["sigmas"] = SigmaSampler(**values["sigmas"])
        if "roles" in values:
            values["roles"] = NAMED_ROLES[values["roles"]]
        return replace(settings, **values)

    methods: dict[str, LoraMethod] = {}

    def build(name: str) -> LoraMethod:
        if name not in methods:
            entry = dict(table[name])
            parent = build(entry.pop("from")) if "from" in entry else LoraMethod(
                name, SubjectSettings(alignment_block=alignment_block), MotionSettings(alignment_block=alignment_block))
            subject, motion = entry.pop("subject", {}), entry.pop("motion", {})
            if "joint" in entry:
                entry["joint"] = world_optim(scaled(entry["joint"]), lr)
            if "schedules" in entry:
                entry["schedules"] = NAMED_SCHEDULES[entry["schedules"]]
            schedules = entry.pop("schedules", parent.schedules)
            methods[name] = replace(parent, name=name, encoders={},
                                    subject=None if subject is False else changed(parent.subject, subject),
                                    motion=changed(parent.motion, motion),
                                    schedules=None if schedules is None else dict(schedules), **entry)
        return methods[name]

    return {name: build(name) for name in table}
