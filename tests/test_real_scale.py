"""benchmarks/real_scale.py's --tiny form: the code a GPU run uses, on tiny Wan models on the CPU. Its JSON holds
each configuration's measures and the estimator's prediction, and a configuration the estimator says does not fit
the device is skipped with the estimator's reason. It builds ComfyUI's WanModel, so it runs where ComfyUI is."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custvid_core.backbones.estimate import GIB, RESERVE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_scale.py"

needs_comfyui = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI checkout (COMFYUI_PATH)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], capture_output=True, text=True, timeout=600,
                          check=True)


@needs_comfyui
def test_tiny_run_measures_each_configuration_and_skips_what_would_not_fit(tmp_path):
    planned = json.loads(_run("--plan").stdout)["configurations"]
    peaks = {c["name"]: c["predicted_peak_gib"] for c in planned}
    wide = next(name for name in peaks if name.startswith("tiny-wide"))
    largest_other = max(p for name, p in peaks.items() if name != wide)
    assert peaks[wide] > largest_other
    # Between them, with the room the estimator keeps for CUDA's context: the wide model alone does not fit.
    device_gib = RESERVE / GIB + (peaks[wide] + largest_other) / 2
    _run("--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--device-gib", repr(device_gib))

    report = json.loads((tmp_path / "real_scale.json").read_text())
    assert "--tiny" in report["command"] and report["device"] == "cpu" and report["gpu"] is None
    assert report["torch"] == torch.__version__ and report["device_gib"] == pytest.approx(device_gib)
    assert report["timed_steps"] == 2 and report["warmup_steps"] == 1
    results = {r["name"]: r for r in report["configurations"]}
    assert list(results) == [c["name"] for c in planned]
    for name, r in results.items():
        assert r["predicted_gib"]["peak"] == pytest.approx(peaks[name])
        assert "error" not in r, r.get("error")
        if name == wide:
            continue
        assert "skipped" not in r and r["steps_run"] == 3 and r["timed_steps"] == 2
        # 9 frames of 64 x 96: 3 latent frames of 8 x 12 (4 x 6 with Wan 2.2 5B's VAE), 2 x 2 patches
        clip = 3 * 2 * 3 if name.startswith("tiny-5b-latents") else 3 * 4 * 6
        assert r["tokens_per_clip"] == clip and max(r["tokens_per_step_by_task"].values()) == clip
        assert set(r["seconds_per_step_by_task"]) <= set(r["tokens_per_step_by_task"])
        assert r["seconds_per_step"] > 0 and r["tokens_per_second"] > 0 and r["achieved_tflops"] > 0
        assert r["seconds_per_clip_step"] > 0  # the recipes take a clip every second step
        assert min(r["seconds_per_step_by_task"].values()) <= r["seconds_per_step"] \
            <= max(r["seconds_per_step_by_task"].values())
        assert "peak_allocated_gib" not in r  # device memory is measured on a GPU only
    assert results[wide]["skipped"].startswith("the estimator says it does not fit: needs ")
    assert f"than {device_gib:g} GiB" in results[wide]["skipped"] and "steps_run" not in results[wide]
    assert [g["met"] for g in report["goals"]] == [None, None]  # the goals' configurations are real sizes


@needs_comfyui
def test_a_spent_time_budget_skips_the_rest_stops_a_run_and_still_writes_the_json(tmp_path):
    # One process (ComfyUI's import is the slow part): the command with no budget left, then a configuration whose
    # deadline passes during its first step.
    argv = [str(SCRIPT), "--tiny", "--out", str(tmp_path), "--budget-s", "0", "--only", "tiny_bf16_*"]
    code = (f"import json, sys, torch; sys.argv = {argv!r}; sys.path.insert(0, {str(SCRIPT.parent)!r}); "
            "import real_scale; real_scale.main(); "
            "print(json.dumps(real_scale.measure(real_scale.TINY_SET[0], torch.device('cpu'), 2, 1, deadline=0.0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True).stdout
    report = json.loads((tmp_path / "real_scale.json").read_text())
    assert [r["name"] for r in report["configurations"]] == ["tiny_bf16_subject_64x96x9_ckpt1",
                                                             "tiny_bf16_motion_64x96x9_ckpt2_offload"]
    assert all(r["skipped"] == "the time budget was spent" for r in report["configurations"])
    assert report["budget_s"] == 0 and len(report["goals"]) == 2
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped"] == "the time budget was spent" and stopped["steps_run"] == 1  # of 3
    assert "seconds_per_step" not in stopped  # the one step run was a warm-up step

def test_a_goal_is_met_within_all_its_limits_and_undecided_until_measured():
    spec = importlib.util.spec_from_file_location("real_scale", SCRIPT)
    real_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_scale)
    goals = [{"goal": "a goal", "config": "a", "at_most": {"seconds_per_clip_step": 1.5, "peak_reserved_gib": 16.0}}]

    def check(**measured):
        return real_scale.goal_checks([{"name": "a", **measured}, {"name": "b", "peak_reserved_gib": 1.0}], goals)[0]

    assert check(seconds_per_clip_step=1.4, peak_reserved_gib=16.0)["met"] is True
    assert check(seconds_per_clip_step=1.6, peak_reserved_gib=15.0)["met"] is False
    assert check(seconds_per_clip_step=1.4, peak_reserved_gib=16.5)["met"] is False
    unmeasured = check(seconds_per_clip_step=1.4)  # run on a CPU: no device peak
    assert unmeasured["met"] is None and unmeasured["measured"] == {"seconds_per_clip_step": 1.4, "peak_reserved_gib": None}
    assert real_scale.goal_checks([], goals)[0]["met"] is None  # skipped, or out of time
    defaults = [real_scale.config_name(s) for s in real_scale.DEFAULT_SET]
    assert [g["config"] for g in real_scale.GOALS] == defaults[:2]  # the goals run first
