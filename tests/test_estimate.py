"""The memory estimator: the Wan sizes' parameter counts against diffusers' models, each saving's effect on the parts,
the estimate against a measured peak, and `python -m custvid_core estimate`."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from custvid_core.backbones.estimate import (
    GIB,
    WAN_SIZES,
    TrainingSetup,
    WanSize,
    estimate,
    fit_table,
)
from custvid_core.backbones.memory import MemorySettings
from custvid_core.cli import main
from custvid_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(WAN_SIZES))
def test_sizes_count_the_parameters_of_the_model_they_describe(name):
    from diffusers import WanTransformer3DModel

    wan = WAN_SIZES[name]
    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=wan.patch, num_attention_heads=wan.heads,
                                      attention_head_dim=wan.dim // wan.heads, in_channels=wan.in_channels,
                                      out_channels=wan.out_channels, text_dim=wan.text_dim, freq_dim=wan.freq_dim,
                                      ffn_dim=wan.ffn_dim, num_layers=wan.layers, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads", eps=1e-6)
    assert wan.params() == sum(p.numel() for p in model.parameters())
    assert wan.block_params() == sum(p.numel() for p in model.blocks[0].parameters())


def test_tokens_follow_the_vae_and_the_patch():
    assert TrainingSetup("wan2.1-1.3b", 480, 832, 33).tokens() == 9 * 30 * 52
    assert TrainingSetup("wan2.1-14b", 512, 512, 81).tokens() == 21 * 32 * 32
    assert TrainingSetup("wan2.2-5b", 480, 832, 81).tokens() == 21 * 15 * 26  # 16x16 VAE


def test_each_saving_lowers_what_it_acts_on():
    base = TrainingSetup("wan2.1-14b", frames=81, checkpointing=False)
    none = estimate(base)
    every = estimate(replace(base, checkpointing=True))
    second = estimate(replace(base, checkpointing=True, memory=MemorySettings(recompute_every=2)))
    offloaded = estimate(replace(base, checkpointing=True, memory=MemorySettings(offload_activations=True)))
    assert none.activations > second.activations > every.activations > offloaded.activations
    assert none.weights == every.weights == offloaded.weights
    swapped = estimate(replace(base, checkpointing=True, memory=MemorySettings(blocks_to_swap=20)))
    block = (WAN_SIZES["wan2.1-14b"].block_params()) * 2
    assert every.weights - swapped.weights == 18 * block  # 20 blocks off, 2 in flight
    # swapping every block is as much recomputation as checkpointing every block
    assert estimate(replace(base, memory=MemorySettings(blocks_to_swap=40))).activations == every.activations
    fp8 = estimate(replace(base, checkpointing=True, precision="fp8"))
    assert 0.45 < fp8.weights / every.weights < 0.55
    loaded = estimate(replace(base, vae_and_text_loaded=True))
    assert loaded.encoders > 10 * GIB and loaded.peak - none.peak == loaded.encoders
    assert estimate(replace(base, batch=2)).activations > 1.9 * none.activations


def test_fits_says_why_not():
    e = estimate(TrainingSetup("wan2.1-14b", frames=81))
    ok, why = e.fits(16)
    parts = {k: v for k, v in e.parts().items() if k != "peak"}
    assert not ok and "16 GiB" in why and max(parts, key=parts.get).replace("_", " ") in why
    assert e.fits(80)[0]


def test_setups_are_refused_naming_the_input():
    for changes, name in ((dict(size="wan3"), "model"), (dict(height=470), "height"), (dict(frames=32), "frames"),
                          (dict(recipe="style"), "recipe"), (dict(precision="fp4"), "precision"),
                          (dict(memory=MemorySettings(blocks_to_swap=31)), "blocks_to_swap"), (dict(batch=0), "batch")):
        with pytest.raises(InputError) as info:
            TrainingSetup(**{"size": "wan2.1-1.3b", **changes})
        assert info.value.input_name == name


def _measured(run: dict) -> int:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "estimator_validation.py"), "--measure",
                          json.dumps(run)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_estimated_activations_grow_with_tokens_as_measured():
    """What training a small Wan adds to the peak memory, measured in fresh processes at two clip lengths: the
    estimate's growth between them within 35% of the measured growth (a model wrong by 2x is well outside)."""
    wan = WanSize("small", dim=512, ffn_dim=2048, heads=4, layers=4)
    runs = [dict(recipe="subject", dim=wan.dim, ffn=wan.ffn_dim, layers=wan.layers, latent=latent,
                 checkpointing=False) for latent in ((3, 16, 32), (5, 32, 32))]
    grown = _measured(runs[1]) - _measured(runs[0])
    setups = [TrainingSetup(wan, 8 * r["latent"][1], 8 * r["latent"][2], 4 * (r["latent"][0] - 1) + 1,
                            checkpointing=False) for r in runs]
    estimated = estimate(setups[1]).activations - estimate(setups[0]).activations
    assert abs(estimated / grown - 1) < 0.35, (estimated, grown)


def test_cli_prints_the_parts_and_refuses_bad_arguments(capsys):
    assert main(["estimate", "--model", "wan2.1-14b", "--precision", "fp8", "--blocks-to-swap", "32", "--size",
                 "512x512", "--frames", "81", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)
    expected = estimate(TrainingSetup("wan2.1-14b", 512, 512, 81, precision="fp8",
                                      memory=MemorySettings(blocks_to_swap=32)))
    assert parts["peak"] == expected.peak and parts["tokens"] == 21 * 32 * 32
    assert main(["estimate", "--card", "12"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "peak" in out and "of 12 GiB" in out
    for argv, named in ((["--size", "480"], "--size"), (["--size", "480x830"], "--size"), (["--frames", "32"], "--frames"),
                        (["--blocks-to-swap", "31"], "--blocks-to-swap"), (["--recompute-every", "0"], "--recompute-every")):
        with pytest.raises(SystemExit) as info:
            main(["estimate", *argv])
        assert info.value.code == 2 and named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["estimate", "--model", "wan9"])
    assert "--model" in capsys.readouterr().err


def test_fit_table_has_a_row_per_model_and_length(capsys):
    assert main(["estimate", "--fit-table"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == fit_table()
    rows = [line for line in out.splitlines() if line.startswith("| wan")]
    assert len(rows) == 2 * len(WAN_SIZES) and all(line.count("|") == 8 for line in rows)
