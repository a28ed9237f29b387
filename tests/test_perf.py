"""The training and sampling benchmarks' plumbing (its numbers come from `bench-training`, not from tests)."""

import json

import pytest

from custvid_core.errors import InputError
from custvid_core.world.bench import perf


def _runs(calls: list, load: list, costs: dict[str, list[float]]):
    """Fake runs: each logs its name and returns its next own cost times the machine's current load, which
    changes after every two runs (a slow or fast spell of a shared machine)."""
    def side(name):
        own = iter(costs[name])

        def run():
            calls.append(name)
            return next(own) * load[(len(calls) - 1) // 2]

        return run

    return {name: side(name) for name in costs}


def test_each_ratio_comes_from_adjacent_runs_after_a_warm_up():
    calls, load = [], [50.0, 1.0, 3.0, 1.0, 8.0, 2.0, 1.0, 5.0]
    sides = _runs(calls, load, {"plain": [1.0] * 8, "double": [9.0] + [2.0] * 3, "half": [9.0] + [0.5] * 3})
    plain = sides.pop("plain")
    result = perf.interleaved_ratios(plain, sides, pairs=3, warmup=1)
    assert calls == ["plain", "double", "plain", "half"] * 4
    # The load changes between pairs, never within one, and the warm-up round (a cold start) is not counted.
    assert result["double"]["pair_ratios"] == [2.0, 2.0, 2.0] and result["half"]["pair_ratios"] == [0.5, 0.5, 0.5]
    assert result["double"]["median"] == result["double"]["min"] == result["double"]["max"] == 2.0
    assert result["half"]["baseline_cost"] == 2.0 and result["half"]["cost"] == 1.0  # per-side medians


def test_a_ratio_is_reported_as_the_median_with_its_spread():
    calls = []
    sides = _runs(calls, [1.0] * 10, {"plain": [1.0] * 5, "other": [2.0, 6.0, 3.0, 5.0, 4.0]})
    ratio = perf.interleaved_ratios(sides["plain"], {"other": sides["other"]}, pairs=5, warmup=0)["other"]
    assert (ratio["median"], ratio["q1"], ratio["q3"], ratio["min"], ratio["max"]) == (4.0, 3.0, 5.0, 2.0, 6.0)
    with pytest.raises(InputError, match="pairs: 1"):
        perf.interleaved_ratios(sides["plain"], {"other": sides["other"]}, pairs=1)


def test_training_bench_writes_ratios(tmp_path, monkeypatch):
    small = {**perf.PERF_WAN, "num_layers": 4, "ffn_dim": 128, "num_attention_heads": 1}
    monkeypatch.setattr(perf, "PERF_WAN", small)
    monkeypatch.setattr(perf, "_in_fresh_process", lambda expr: perf.peak_memory_mb("True" in expr, steps=1) + 1.0)
    result = perf.run_training_bench(tmp_path, steps=2, pairs=2, command="python -m custvid_core bench-training")
    saved = json.loads((tmp_path / "training_perf.json").read_text())
    assert set(saved["ratios"]) == {"full_image_step_over_plain", "full_image_step_2048_projector_over_plain",
                                    "full_with_preservation_over_plain", "peak_memory_checkpointing_over_none"}
    assert saved["command"] == "python -m custvid_core bench-training"
    assert all(v > 0 for v in result["step_seconds"].values())
    for name, spread in saved["spread"].items():
        assert len(spread["pair_ratios"]) == 2 and spread["min"] <= saved["ratios"][name] <= spread["max"]
    assert "gradient checkpointing" in (tmp_path / "training_perf.md").read_text()


def test_training_bench_refuses_an_odd_step_count(tmp_path):
    with pytest.raises(InputError, match="steps: 3"):
        perf.run_training_bench(tmp_path, steps=3)
    assert not any(tmp_path.iterdir())


def test_control_sampling_benchmark_runs_every_control(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "_in_fresh_process",
                        lambda expr: perf.sampling_peak_memory_mb(expr.split("'")[1], size=24, steps=1) + 1.0)
    result = perf.run_control_perf(tmp_path, steps=1, size=24, pairs=2)
    assert set(result["step_seconds"]) == {"plain", "steering", "camera", "both"}
    assert {n: len(s["pair_ratios"]) for n, s in result["spread"].items()} == \
        {"steering_over_plain": 2, "camera_over_plain": 2, "both_over_plain": 2}
    assert all(s > 0 for s in result["step_seconds"].values())
    assert set(result["peak_memory_mb"]) == {"plain", "steering"} and result["ratios"]["steering_peak_memory_over_plain"] > 0
    assert "peak memory" in (tmp_path / "control_perf.md").read_text()
