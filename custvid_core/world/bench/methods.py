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
from ...training.loop import OptimSettings, warmup_steps
from ...training.objectives import SigmaSampler
from ..customize import LoraMethod

METHODS_FILE = Path(__file__).with_name("methods.toml")
# Names the file uses for values too long to write there.
NAMED_ROLES = {"all": ROLES}
NAMED_SCHEDULES = {"smrabooth": SMRABOOTH_TIMING}


def world_optim(steps: int, lr: float) -> OptimSettings:
    """The optimiser of the world's methods: warm-up for a tenth of the steps (at most 20), one checkpoint at the end."""
    return OptimSettings(steps=steps, lr=lr, warmup=warmup_steps(steps), checkpoint_every=max(1, steps))


def method_names(path: str | Path = METHODS_FILE) -> list[str]:
    return list(tomllib.loads(Path(path).read_text()))


def lora_methods(steps: int = 300, lr: float = 1e-3, alignment_block: int = 1,
                 path: str | Path = METHODS_FILE) -> dict[str, LoraMethod]:
    """The methods of `path` for a ladder of `steps` training steps at learning rate `lr`, in the file's order;
    `alignment_block`: the block SuRA and MoRA align (for every method)."""
    table = tomllib.loads(Path(path).read_text())

    def scaled(fraction: str) -> int:
        f = Fraction(fraction)
        return steps * f.numerator // f.denominator

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
