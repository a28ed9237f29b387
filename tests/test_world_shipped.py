"""The shipped shapes-world weights: made by the repository's own command, loadable, and good enough."""

import dataclasses
import json
import shlex

import pytest

from custvid_core.cli import build_parser, train_config_from_args, world_spec_from_args
from custvid_core.files import load_safetensors
from custvid_core.world.model import DEFAULT_CONFIG, MODEL_FILE, PANS_MODEL_FILE, TEXT_FILE, load_world, text_file_for

SHIPPED = [pytest.param(f, id=f.stem, marks=pytest.mark.skipif(not f.exists(), reason=f"{f.name} is not trained yet"))
           for f in (MODEL_FILE, PANS_MODEL_FILE)]


@pytest.mark.parametrize("model_file", SHIPPED)
def test_shipped_model_matches_the_command_that_made_it(model_file):
    _, meta = load_safetensors(model_file)
    info = json.loads(meta["custvid.world.info"])
    args = build_parser().parse_args(shlex.split(info["command"])[3:])  # after "python -m custvid_core"
    train = dataclasses.asdict(train_config_from_args(args))
    # Options added after the file was made must be off in its command, so the command still makes it.
    added_later = {"pan_fraction": 0.0, "pan_speed_min": None, "pan_speed_max": None, "init_from": "",
                   "centred_jitter": -1.0, "sigma_sampling": "logit_normal", "sigma_shift": None,
                   "heads": 1}
    for key in set(train) - set(info["train_config"]):
        assert key in added_later and added_later[key] in (None, train[key]), key
        del train[key]
    assert info["train_config"] == train and info["seed"] == train["seed"]
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_CONFIG.items()}
    expected.update(num_layers=train["layers"], ffn_dim=train["ffn"], num_attention_heads=train.get("heads", 1))
    assert json.loads(meta["custvid.world.config"]) == expected
    spec = {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(world_spec_from_args(args)).items()}
    stored = json.loads(meta["custvid.world.spec"])
    spec_added_later = {"wallpaper_contrast": 0.035}  # files made before it hold the default
    for key in set(spec) - set(stored):
        assert key in spec_added_later and spec[key] == spec_added_later[key], key
        del spec[key]
    # Defaults that changed since: a command without the option was run with the default of its time.
    changed_defaults = {"object_size": ("--object-size", [10.0, 13.0])}
    for key, (option, default_then) in changed_defaults.items():
        if option not in info["command"]:
            spec[key] = default_then
    assert stored == spec


@pytest.mark.parametrize("model_file", SHIPPED)
def test_shipped_world_loads_with_its_text_encoder(model_file):
    world = load_world(model_file, text_file_for(model_file))
    assert world.backbone.dim % 128 == 0 and world.text.length == 16


def _pretraining(info: dict) -> dict:
    """The first run of a chain of fine-tunes (each file records the run it started from)."""
    while "started_from" in info:
        info = info["started_from"]
    return info


@pytest.mark.skipif(not PANS_MODEL_FILE.exists(), reason="the panning world is not trained yet")
def test_the_panning_world_shares_the_shipped_worlds_pretraining():
    world, pans = load_world(MODEL_FILE, TEXT_FILE), load_world(PANS_MODEL_FILE, text_file_for(PANS_MODEL_FILE))
    assert _pretraining(pans.info) == _pretraining(world.info) and "started_from" in pans.info
    assert pans.info["train_config"]["init_from"] == str(MODEL_FILE.relative_to(MODEL_FILE.parents[4]))
    assert pans.info["train_config"]["pan_fraction"] > 0 and pans.spec.wallpaper_contrast > world.spec.wallpaper_contrast
