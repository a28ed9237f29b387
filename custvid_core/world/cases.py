"""Customization cases: a subject (a few rendered photos with masks) and a motion (a few clips of
*other* subjects following a path), both usually never seen in pretraining, plus prompts.

A case file is JSON:

    {"cases": [{
        "name": "orange_star_circle",
        "seed": 0,
        "subject": {"colour": "orange", "shape": "star", "texture": "plain", "object_size": 17,
                    "images": 4, "words": "orange star"},
        "motion": {"path": "circle", "path_params": {"turns": 1.0}, "start": [23, 16],
                   "clips": 3, "words": "",
                   "subjects": [["green", "square", "plain"], ["blue", "triangle", "striped"]]},
        "prompts": ["{subject} {motion}"]
    }]}

`object_size` (pixels; default: the middle of the world's range) sizes subject and motion objects.
`start` and `path_params` place the path as in `Scene` (pixels of the world's frame); each motion
clip shifts the whole path by a random offset that keeps it in frame. `words` are what a model
without customization is prompted with; customization methods put their own tokens in the
`{subject}` and `{motion}` slots of the prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from .scene import Clip, Scene, WorldSpec, path_centres, render, scene_from_dict

DEFAULT_CASES = Path(__file__).parent / "cases" / "default.json"
SUBJECT_KEYS = {"colour", "shape", "texture", "object_size", "images", "words"}
MOTION_KEYS = {"path", "path_params", "direction", "speed", "start", "clips", "words", "subjects", "object_size"}


@dataclass
class Case:
    name: str
    subject: dict
    motion: dict
    prompts: list[str]
    seed: int = 0
    spec: WorldSpec = field(default_factory=WorldSpec)

    def subject_scene(self) -> Scene:
        s = self.subject
        return scene_from_dict({"colour": s["colour"], "shape": s["shape"], "texture": s.get("texture", "plain"),
                                "object_size": float(s.get("object_size", sum(self.spec.object_size) / 2))})

    def motion_scene(self) -> Scene:
        m = self.motion
        return scene_from_dict({k: m[k] for k in ("path", "path_params", "direction", "speed", "start",
                                                  "object_size") if k in m})

    def reference_path(self) -> torch.Tensor:
        """[F, 2] the motion's path (normalised), as placed in the case file."""
        return path_centres(self.motion_scene(), self.spec.frames, self.spec.size) / self.spec.size

    def subject_images(self) -> list[Clip]:
        """Still photos of the subject at random positions, sizes and backgrounds (one frame each)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + 1)
        base = self.subject_scene()
        still = WorldSpec(size=self.spec.size, frames=1)
        out = []
        for _ in range(int(self.subject.get("images", 4))):
            size = base.object_size * float(0.9 + 0.2 * torch.rand((), generator=g))
            margin = size / 2 + 1
            start = tuple(float(margin + (self.spec.size - 2 * margin) * torch.rand((), generator=g)) for _ in range(2))
            offset = tuple(float(64 * torch.rand((), generator=g)) for _ in range(2))
            out.append(render(Scene(colour=base.colour, shape=base.shape, texture=base.texture, object_size=size,
                                    start=start, background_offset=offset,
                                    background_seed=int(torch.randint(2 ** 31 - 1, (1,), generator=g))), still))
        return out

    def motion_subjects(self) -> list[tuple[str, str, str]]:
        """(colour, shape, texture) of each motion clip's subject, in clip order."""
        subjects = self.motion.get("subjects") or [["green", "square", "plain"]]
        return [tuple(subjects[i % len(subjects)]) for i in range(int(self.motion.get("clips", 3)))]

    def motion_clips(self) -> list[Clip]:
        """Clips of other subjects following the motion's path, each shifted to a random place in frame."""
        g = torch.Generator().manual_seed(self.seed * 7919 + 2)
        template = self.motion_scene()
        centres = path_centres(template, self.spec.frames, self.spec.size)
        out = []
        for colour, shape, texture in self.motion_subjects():
            half = template.object_size / 2
            lo = (half - centres.min(0).values).clamp(max=0)
            hi = (self.spec.size - half - centres.max(0).values).clamp(min=0)
            shift = lo + (hi - lo) * torch.rand(2, generator=g)
            if template.path == "bounce":  # reflections at the walls: a shifted start is another path
                shift = torch.zeros(2)
            scene = scene_from_dict({**{k: v for k, v in template.__dict__.items()}, "colour": colour,
                                     "shape": shape, "texture": texture})
            scene.start = (template.start[0] + float(shift[0]), template.start[1] + float(shift[1]))
            if scene.path == "circle":
                cx, cy = scene.path_params.get("center", (self.spec.size / 2, self.spec.size / 2))
                scene.path_params = {**scene.path_params, "center": (cx + float(shift[0]), cy + float(shift[1]))}
            if "points" in scene.path_params:
                offset = (shift / self.spec.size).tolist()
                scene.path_params = {**scene.path_params, "points": [[x + offset[0], y + offset[1]]
                                                                     for x, y in scene.path_params["points"]]}
            scene.background_offset = tuple(float(64 * torch.rand((), generator=g)) for _ in range(2))
            scene.background_seed = int(torch.randint(2 ** 31 - 1, (1,), generator=g))
            out.append(render(scene, self.spec))
        return out

    def prompt_texts(self, subject_words: str, motion_words: str) -> list[str]:
        return [" ".join(p.format(subject=subject_words, motion=motion_words).split()) for p in self.prompts]


def _check_keys(data: dict, allowed: set, where: str):
    unknown = set(data) - allowed
    if unknown:
        raise InputError(f"{where}.{sorted(unknown)[0]}", "is not a known field", f"fields among {sorted(allowed)}")


def load_cases(path: str | Path = DEFAULT_CASES) -> list[Case]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError("--cases", f"'{path}' does not exist", "a case file (JSON)") from e
    except json.JSONDecodeError as e:
        raise InputError("--cases", f"'{path.name}' is not valid JSON ({e})", "a case file (JSON)") from e
    spec = WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.get("world", {}).items()})
    cases = []
    for i, c in enumerate(data.get("cases", [])):
        where = f"cases[{i}]"
        for key in ("name", "subject", "motion", "prompts"):
            if key not in c:
                raise InputError(f"{where}.{key}", "is missing", "name, subject, motion and prompts in every case")
        _check_keys(c["subject"], SUBJECT_KEYS, f"{where}.subject")
        _check_keys(c["motion"], MOTION_KEYS, f"{where}.motion")
        case = Case(c["name"], c["subject"], c["motion"], list(c["prompts"]), int(c.get("seed", 0)), spec)
        case.subject_scene(), case.motion_scene()  # validate names now, not mid-benchmark
        cases.append(case)
    if not cases:
        raise InputError("--cases", f"'{path.name}' holds no cases", "a JSON object with a non-empty 'cases' list")
    return cases
