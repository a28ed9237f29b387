"""DualReal as a shapes-world benchmark method: trained on a case's sets, generated with its parts attached (tiny runs)."""

from dataclasses import replace

import pytest
import torch

from custvid_core.adapters.dualreal import load_dualreal
from custvid_core.errors import InputError
from custvid_core.representations.subject import build_dinov2
from custvid_core.world.bench.methods import dualreal_methods, lora_methods, method_names
from custvid_core.world.cases import load_cases
from custvid_core.world.dualreal import generate_with_dualreal
from custvid_core.world.encoders import DINO_CONFIG
from custvid_core.world.model import DEFAULT_CONFIG, build_world
from custvid_core.world.sample import generate

TINY = {**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64}


@pytest.mark.parametrize("name", ["dualreal", "dualreal_fixed"])
def test_the_method_trains_and_generates_with_the_adapters_and_controller_attached(tmp_path, name):
    world = build_world(TINY)
    case = load_cases()[0]
    method = replace(dualreal_methods(steps=2)[name], sampling_steps=2)
    before = {k: v.clone() for k, v in world.backbone.model.state_dict().items()}
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": "sks", "motion": "mtn"}
    clips = run(["sks mtn"], 0)
    assert clips.shape == (1, 5, 32, 32, 3)
    after = world.backbone.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # attached, never merged into the model
    assert not torch.allclose(clips, generate(world, ["sks mtn"], seed=0, steps=2, progress=lambda *_: None))
    weights = load_dualreal(tmp_path / f"{case.name}_dualreal.safetensors")
    assert set(weights.parts) == ({"identity", "motion", "controller"} if name == "dualreal" else {"identity", "motion"})
    # The saved file generates the same clip.
    assert torch.equal(generate_with_dualreal(world, weights, ["sks mtn"], 0, steps=2), clips)
    diagnostics = __import__("json").loads((tmp_path / "diagnostics.json").read_text())
    history = diagnostics["history"]
    assert len(history) == 11  # 11/2 of the ladder's 2 steps
    assert {k for r in history for k in r} >= {"motion", "identity"}
    per_step = diagnostics["controller_identity_weights"]["0"]
    if name == "dualreal":  # one weight per group (one group per block here) at each sampling step, within (0, 0.2)
        assert len(per_step) == 2 and all(len(w) == 2 and all(0 < x < 0.2 for x in w) for w in per_step)
    else:
        assert per_step == []


def test_the_motion_adapters_can_take_the_world_dino_feature(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    torch.manual_seed(0)
    dino = build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny")
    method = replace(dualreal_methods(steps=2)["dualreal_dino"], sampling_steps=2, encoders={"dino": dino})
    run, _ = method.prepare(world, case, tmp_path)
    weights = load_dualreal(tmp_path / f"{case.name}_dualreal.safetensors")
    assert weights.parts["motion"].metadata["spec"]["condition_dim"] == DINO_CONFIG["hidden_size"]
    assert weights.parts["identity"].metadata["spec"]["condition_dim"] == 0
    clips = run(["sks mtn"], 0)
    assert clips.shape == (1, 5, 32, 32, 3)
    # Without the reference the motion adapters were trained with, generating is refused with the input named.
    with pytest.raises(InputError, match="image_embedding"):
        generate_with_dualreal(world, weights, ["sks mtn"], 0, steps=2)


def test_the_methods_file_names_dualreal_and_its_ablations_on_the_isolated_pairs_data_and_budget():
    methods = dualreal_methods()
    assert list(methods) == ["dualreal", "dualreal_dino", "dualreal_no_mask", "dualreal_fixed", "dualreal_groups_1",
                             "dualreal_groups_2", "dualreal_groups_3", "dualreal_pure_residual", "dualreal_controller_lr"]
    assert set(methods) <= set(method_names()) and not set(methods) & set(lora_methods())
    isolated = lora_methods()["full_moving"]
    budget = isolated.subject.optim.steps + isolated.motion.optim.steps
    for name, method in methods.items():
        s = method.settings
        assert s.optim.steps == budget and s.optim.lr == 1e-3 and s.optim.betas == (0.9, 0.95), name
        assert (method.moving_clips, method.hue_copies) == (isolated.moving_clips, isolated.hue_copies), name
        assert s.sigmas == isolated.subject.sigmas == isolated.motion.sigmas, name
    changed = {n: (m.settings.gradient_mask, m.settings.controller, m.settings.groups, m.image_condition,
                   m.settings.residual, m.settings.controller_lr) for n, m in methods.items()}
    assert changed == {"dualreal": (True, True, None, None, "code", None),
                       "dualreal_dino": (True, True, None, "dino", "code", None),
                       "dualreal_no_mask": (False, True, None, None, "code", None),
                       "dualreal_fixed": (True, False, None, None, "code", None),
                       "dualreal_groups_1": (True, True, 1, None, "code", None),
                       "dualreal_groups_2": (True, True, 2, None, "code", None),
                       "dualreal_groups_3": (True, True, 3, None, "code", None),
                       "dualreal_pure_residual": (True, True, None, None, "pure", None),
                       "dualreal_controller_lr": (True, True, None, None, "code", 1e-5)}
    with pytest.raises(InputError, match="image_condition"):
        replace(methods["dualreal"], image_condition="clip")
