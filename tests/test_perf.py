"""The training and sampling benchmarks' plumbing (its numbers come from `bench-training`, not from tests)."""

import json

from custvid_core import perf


def test_training_bench_writes_ratios(tmp_path, monkeypatch):
    small = {**perf.PERF_WAN, "num_layers": 4, "ffn_dim": 128, "num_attention_heads": 1}
    monkeypatch.setattr(perf, "PERF_WAN", small)
    monkeypatch.setattr(perf, "_in_fresh_process", lambda expr: perf.peak_memory_mb("True" in expr, steps=1) + 1.0)
    result = perf.run_training_bench(tmp_path, steps=2)
    saved = json.loads((tmp_path / "training_perf.json").read_text())
    assert set(saved["ratios"]) == {"full_image_step_over_plain", "full_image_step_2048_projector_over_plain",
                                    "full_with_preservation_over_plain", "peak_memory_checkpointing_over_none"}
    assert all(v > 0 for v in result["step_seconds"].values())
    assert "gradient checkpointing" in (tmp_path / "training_perf.md").read_text()


def test_control_sampling_benchmark_runs_every_control(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "_in_fresh_process",
                        lambda expr: perf.sampling_peak_memory_mb(expr.split("'")[1], size=24, steps=1) + 1.0)
    result = perf.run_control_perf(tmp_path, steps=1, size=24)
    assert set(result["step_seconds"]) == {"plain", "steering", "camera", "both"}
    assert all(s > 0 for s in result["step_seconds"].values())
    assert set(result["peak_memory_mb"]) == {"plain", "steering"} and result["ratios"]["steering_peak_memory_over_plain"] > 0
    assert "peak memory" in (tmp_path / "control_perf.md").read_text()
