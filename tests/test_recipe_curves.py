"""The recipes learn the same as they did when their curves were recorded: for a fixed seed, every step's loss,
its named parts and the gradient norm match `data/recipe_curves.json` to 1e-6, and so do the trained tensors' sums.

The file was written by the code before the training engine was reshaped into parts, tasks and phase schedules;
rewrite it (`CUSTVID_RECORD_CURVES=1 pytest tests/test_recipe_curves.py`) only for a change meant to alter
what a recipe learns, and say so in the commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.backbones import describe
from custvid_core.training import (
    MotionSettings,
    MovingClips,
    OptimSettings,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    train_joint,
    train_motion,
    train_subject,
)

CURVES = Path(__file__).parent / "data" / "recipe_curves.json"
RECORD = os.environ.get("CUSTVID_RECORD_CURVES") == "1"
OPTIM = dict(lr=1e-3, warmup=2, checkpoint_every=100)


def _clips(g, n=2, frames=2, stills=True, flow=True):
    return dict(latents=torch.randn(n, 16, frames, 8, 8, generator=g), context=torch.randn(n, 5, 64, generator=g),
                flow=torch.randn(n, 4 * (frames - 1), 2, 32, 32, generator=g) if flow else None,
                stills=torch.randn(n, 3, 16, 1, 8, 8, generator=g) if stills else None)


def _subject(g, moving=True, stills=True):
    masks = torch.zeros(3, 1, 1, 8, 8)
    masks[..., 2:6, 1:5] = 1
    context = torch.randn(1, 5, 64, generator=g)
    preservation = VideoSet(**{**_clips(g, stills=stills), "flow": None})
    data = dict(latents=torch.randn(3, 16, 1, 8, 8, generator=g), context=context, masks=masks,
                dino_tokens=torch.randn(3, 24, 5, 5, generator=g), preservation=preservation, subject_tokens=(1, 2),
                trigger_words="sks")
    moving_set = None
    if moving:
        moving_masks = torch.zeros(4, 1, 2, 8, 8)
        moving_masks[..., 1:5, 2:6] = 1
        moving_set = MovingClips(torch.randn(4, 16, 2, 8, 8, generator=g), context, moving_masks)
    return SubjectSet(**data, moving=moving_set)


def _subject_settings(steps, **kw):
    return SubjectSettings(rank=4, alignment_block=1, projector_hidden=32, optim=OptimSettings(steps=steps, **OPTIM),
                           **kw)


def _motion_settings(steps, **kw):
    return MotionSettings(rank=4, spatial_rank=2, alignment_block=1, projector_hidden=32,
                          optim=OptimSettings(steps=steps, **OPTIM), **kw)


def _run(case: str) -> dict:
    backbone = describe(tiny_diffusers_wan())
    g = torch.Generator().manual_seed(7)
    if case == "subject_every_option":  # stillness LoRA, preservation, moving clips, SuRA, STCA, trigger embedding
        trained = [train_subject(backbone, _subject(g), _subject_settings(
            9, stillness_rank=2, trigger_embedding=True, region_margin=1, moving_share=0.5))]
    elif case == "subject_preservation":  # photos and preservation clips in turn, no stillness LoRA
        trained = [train_subject(backbone, _subject(g, moving=False, stills=False),
                                 _subject_settings(6, token_attention_blocks=(0,)))]
    elif case == "motion_spatial_stills":  # the spatial phase on stills, MoRA on features, the debiased loss
        trained = [train_motion(backbone, VideoSet(**_clips(g)), _motion_settings(6))]
    elif case == "motion_frames":  # the spatial phase on single latent frames, three-frame clips
        trained = [train_motion(backbone, VideoSet(**_clips(g, frames=3, stills=False)), _motion_settings(6))]
    elif case == "joint":
        subject = _subject(g)
        motion = VideoSet(**_clips(g))
        trained = list(train_joint(backbone, subject, motion, _subject_settings(1, stillness_rank=2),
                                   _motion_settings(1), OptimSettings(steps=10, **OPTIM), motion_probability=0.4))
    else:
        raise ValueError(case)
    return {"curves": [[{k: v for k, v in r.items() if k not in ("seconds",)} for r in t.history] for t in trained],
            "sums": [{k: float(v.double().abs().sum()) for k, v in sorted(t.tensors.items())} for t in trained],
            "embedding": [None if t.trigger_embedding is None else float(t.trigger_embedding.double().abs().sum())
                          for t in trained]}


CASES = ("subject_every_option", "subject_preservation", "motion_spatial_stills", "motion_frames", "joint")


def _close(a, b, where: str):
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: fields {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} entries != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.parametrize("case", CASES)
def test_the_recipe_learns_as_recorded(case):
    got = _run(case)
    if RECORD:
        recorded = json.loads(CURVES.read_text()) if CURVES.exists() else {}
        recorded[case] = got
        CURVES.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        pytest.skip("recorded")
    _close(got, json.loads(CURVES.read_text())[case], case)
