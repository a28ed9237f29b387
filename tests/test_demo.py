"""The main job (`make demo`): a case learned and generated beside the base model, on a tiny world in a few steps."""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from custvid_core.representations.motion import build_raft
from custvid_core.representations.subject import build_dinov2
from custvid_core.world.bench.methods import lora_methods
from custvid_core.world.cases import load_cases
from custvid_core.world.demo import MOTION_MATCH, SUBJECT_MATCH, run_demo
from custvid_core.world.encoders import DINO_CONFIG
from custvid_core.world.model import DEFAULT_CONFIG, build_world


def test_the_demo_learns_a_case_and_writes_base_and_customized_side_by_side(tmp_path, capsys):
    world = build_world({**DEFAULT_CONFIG, "num_layers": 1, "ffn_dim": 64})
    case = next(c for c in load_cases() if c.name == "purple_heart_bounce")
    torch.manual_seed(0)
    encoders = {"dino": build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny"),
                "raft": build_raft("raft_small")}
    # The quickest rung: the demo's path is the same for every rung (the default's training is measured in README).
    method = replace(lora_methods(steps=2)["plain_lora"], sampling_steps=2, encoders=encoders)
    summary = run_demo(world, case, method, tmp_path, seed=0, log=print)

    written = {p.name for p in tmp_path.iterdir()}
    assert {f"{side}.{ext}" for side in ("base", "customized", "side_by_side") for ext in ("mp4", "gif")} <= written
    assert {"contact_sheet.png", "case.png", "flow_preview.png", "motion.safetensors", "subject.safetensors",
            "summary.json"} <= written
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # The training went through the benchmark's rung and kept its LoRAs.
    assert {p.name for p in (tmp_path / "training").glob("*.safetensors")} >= {f"{case.name}_subject.safetensors",
                                                                               f"{case.name}_motion.safetensors"}
    assert summary["training_steps"] == {"subject": 2, "motion": 2}
    assert summary["training_resumed"] is False and summary["seconds"]["training"] > 0

    # The same seed and prompt template for both sides: the base model with the case's words, the customized
    # one with the learned words; each measured against the case's subject and motion.
    assert summary["prompts"] == {"base": "purple checkered heart", "customized": "sks mtn"}
    for side in ("base", "customized"):
        assert set(summary["measurements"][side]["subject_match"]) == set(SUBJECT_MATCH)
        assert set(summary["measurements"][side]["motion_match"]) == set(MOTION_MATCH)

    # One contact sheet, base row above customized row; the side-by-side clip is both widths and a gap.
    frames = world.spec.frames
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (frames * 32 * 4 + (frames - 1) * 2, 2 * 32 * 4 + 2)
    assert Image.open(tmp_path / "side_by_side.gif").size == ((2 * 32 + 2) * 8, 32 * 8)

    # Progress bars for both trainings and both samplings.
    err = capsys.readouterr().err
    assert "subject LoRA" in err and "motion LoRA" in err and "sampling" in err

    # A rerun resumes the finished training and draws the same clips.
    again = run_demo(world, case, method, tmp_path, seed=0, log=print)
    assert again["training_resumed"] is True and again["measurements"] == summary["measurements"]


@pytest.mark.parametrize("option, value, named", [("--case", "orange_cube_spin", "case"),
                                                  ("--method", "base", "method"),
                                                  ("--training-steps", "0", "training-steps")])
def test_the_demo_refuses_bad_options_before_any_work(tmp_path, capsys, option, value, named):
    from custvid_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "demo"), option, value])
    assert exit_.value.code == 2 and f"error: {named}:" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
