"""How well a world model follows its own vocabulary: colour, shape and motion direction rates."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

from .measures import describe_clip
from .sample import generate
from .scene import DIRECTIONS, SEEN_COLOURS, SEEN_SHAPES, SEEN_TEXTURES, Scene

TEXTURED = 0.2  # texture_contrast above this reads as a textured object


@dataclass
class VocabularyScores:
    samples: int
    colour: float
    shape: float
    direction: float
    texture: float  # textured objects look textured and plain ones plain
    present: float  # frames with an object
    shape_confusion: dict[str, dict[str, int]]  # prompted shape -> shape recognised -> clips

    def as_dict(self):
        return self.__dict__.copy()


def vocabulary_prompts(count: int, seed: int = 0) -> list[Scene]:
    combos = list(itertools.product(SEEN_COLOURS, SEEN_TEXTURES, SEEN_SHAPES, DIRECTIONS))
    random.Random(seed).shuffle(combos)
    return [Scene(colour=c, texture=t, shape=s, direction=d) for c, t, s, d in combos[:count]]


def evaluate_vocabulary(world, prompts: int = 24, seeds=(0, 1), steps: int = 30, cfg: float = 4.0,
                        shift: float = 3.0, batch: int = 8) -> VocabularyScores:
    scenes = vocabulary_prompts(prompts)
    hits = dict(colour=0, shape=0, direction=0, texture=0)
    confusion = {s: Counter() for s in SEEN_SHAPES}
    present, n = 0.0, 0
    for seed in seeds:
        for start in range(0, len(scenes), batch):
            chunk = scenes[start:start + batch]
            clips = generate(world, [s.prompt() for s in chunk], seed=seed * 1000 + start, steps=steps, cfg=cfg,
                             shift=shift, progress=lambda *_: None)
            for scene, frames in zip(chunk, clips):
                r = describe_clip(frames, SEEN_SHAPES)
                hits["colour"] += r.colour == scene.colour
                hits["shape"] += r.shape == scene.shape
                confusion[scene.shape][str(r.shape)] += 1
                hits["direction"] += r.direction == scene.direction
                textured = r.texture_contrast > TEXTURED
                hits["texture"] += textured == (scene.texture != "plain")
                present += r.present_frames
                n += 1
    return VocabularyScores(n, *(hits[k] / n for k in ("colour", "shape", "direction", "texture")), present / n,
                            {s: dict(c) for s, c in confusion.items()})
