"""Wan 2.2's experts in training: a range of noise levels per run (the draws stay inside it, keep their
distribution's shape there, and leave today's full-range draws and checkpoints as they were), used by every recipe's
noise draw; and Wan 2.2 TI2V-5B's 48 latent channels through the recipes, on tiny diffusers Wans."""

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import (
    MotionSettings,
    OptimSettings,
    SigmaSampler,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    train_joint,
    train_motion,
    train_subject,
)
from custvid_core.training.dualreal import DualRealSettings, train_dualreal
from custvid_core.training.fingerprint import settings_record
from custvid_core.training.objectives import EXPERT_BOUNDARY, expert_range


@pytest.mark.parametrize("mode, shift", [("logit_normal", 1.0), ("logit_normal", 5.0), ("uniform", 3.0),
                                         ("uniform", 12.0)])
@pytest.mark.parametrize("which", ["high_noise", "low_noise"])
def test_draws_stay_in_the_range_and_keep_the_full_draws_shape_there(mode, shift, which):
    low, high = expert_range(which, EXPERT_BOUNDARY["t2v"])
    full = SigmaSampler(mode, shift)
    drawn = full.within(low, high)(20000, torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.float32 and drawn.min() >= low and drawn.max() <= high
    # The full draw's levels that fall in the range: the same distribution (two-sample Kolmogorov-Smirnov distance).
    reference = full(400000, torch.Generator().manual_seed(1))
    reference = reference[(reference >= low) & (reference <= high)]
    grid = torch.linspace(low, high, 200)
    cdf = lambda x: (x[:, None] <= grid[None]).float().mean(0)  # noqa: E731
    assert (cdf(drawn) - cdf(reference)).abs().max() < 0.02


def test_the_full_range_draws_what_it_always_drew_and_records_no_new_setting():
    """The default range takes the draw's old path (the recorded loss curves depend on it) and is left out of the
    settings a checkpoint records, so checkpoints written before the range existed still resume."""
    g, again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    shift = 5.0
    t = torch.sigmoid(torch.randn(64, generator=again))
    assert torch.equal(SigmaSampler(shift=shift)(64, g), shift * t / (1 + (shift - 1) * t))
    assert set(settings_record(SigmaSampler())) == {"mode", "shift", "mean", "std"}
    ranged = settings_record(SigmaSampler().within(0.875, 1.0))
    assert ranged["low"] == "0.875" and "high" not in ranged


@pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.9, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_an_empty_or_outside_range_is_refused(low, high):
    with pytest.raises(InputError, match="noise_range"):
        SigmaSampler(low=low, high=high)


@pytest.mark.parametrize("which, boundary, input_name", [("middle", 0.875, "noise_range"),
                                                         ("high_noise", 1.0, "expert_boundary"),
                                                         ("low_noise", 0.0, "expert_boundary")])
def test_a_bad_expert_choice_is_refused_naming_the_input(which, boundary, input_name):
    with pytest.raises(InputError, match=input_name):
        expert_range(which, boundary)


def _data(channels=16):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    clips = VideoSet(torch.randn(2, channels, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    subject = SubjectSet(torch.randn(2, channels, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), masks,
                         preservation=clips)
    return subject, clips


def _recording(backbone):
    """The noise levels every forward of `backbone` is given, in order."""
    seen = []
    forward = backbone.forward

    def recorded(latents, sigma, context, image=None):
        seen.extend(torch.as_tensor(sigma).flatten().tolist())
        return forward(latents, sigma, context, image)

    backbone.forward = recorded
    return seen


OPTIM = OptimSettings(steps=6, lr=1e-3, warmup=0)
RECIPES = {
    "subject": lambda b, subject, clips, sigmas: train_subject(b, subject, SubjectSettings(
        rank=2, optim=OPTIM, sigmas=sigmas, alignment_weight=0.0)),
    "motion": lambda b, subject, clips, sigmas: train_motion(b, clips, MotionSettings(
        rank=2, spatial_rank=2, optim=OPTIM, sigmas=sigmas, alignment_weight=0.0)),
    "joint": lambda b, subject, clips, sigmas: train_joint(
        b, subject, clips, SubjectSettings(rank=2, sigmas=sigmas, alignment_weight=0.0),
        MotionSettings(rank=2, spatial_rank=2, sigmas=sigmas, alignment_weight=0.0), OPTIM),
    "dualreal": lambda b, subject, clips, sigmas: train_dualreal(b, subject, clips, DualRealSettings(
        bottleneck=4, optim=OPTIM, sigmas=sigmas)),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_draws_its_noise_levels_in_the_runs_range(recipe):
    subject, clips = _data()
    low, high = expert_range("high_noise", EXPERT_BOUNDARY["i2v"])
    backbone = describe(tiny_diffusers_wan())
    seen = _recording(backbone)
    RECIPES[recipe](backbone, subject, clips, SigmaSampler(shift=3.0).within(low, high))
    assert len(seen) >= OPTIM.steps and all(low <= s <= high for s in seen), seen


def test_experts_trained_each_on_its_side_learn_only_there_and_leave_the_other_expert_as_it_was():
    """One LoRA per expert (the high-noise expert's run, then the low-noise one's): each expert is shown only its
    side of the boundary, and neither run changes either model's own weights."""
    subject, clips = _data()
    boundary = EXPERT_BOUNDARY["t2v"]
    experts = {"high_noise": describe(tiny_diffusers_wan()), "low_noise": describe(tiny_diffusers_wan())}
    with torch.no_grad():  # two different experts
        for p in experts["low_noise"].model.parameters():
            p.add_(0.01)
    before = {name: {k: v.clone() for k, v in e.model.state_dict().items()} for name, e in experts.items()}
    seen = {name: _recording(e) for name, e in experts.items()}
    loras = {}
    for name, expert in experts.items():
        low, high = expert_range(name, boundary)
        loras[name] = RECIPES["motion"](expert, subject, clips, SigmaSampler(shift=5.0).within(low, high)).tensors
    assert seen["high_noise"] and all(s >= boundary for s in seen["high_noise"])
    assert seen["low_noise"] and all(s <= boundary for s in seen["low_noise"])
    for name, expert in experts.items():
        after = expert.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    assert loras["high_noise"].keys() == loras["low_noise"].keys()
    assert any(not torch.equal(loras["high_noise"][k], loras["low_noise"][k]) for k in loras["high_noise"])


def test_the_recipes_train_a_48_channel_wan_22_5b_layout():
    """Wan 2.2 TI2V-5B's latents have 48 channels: every recipe learns on them and its LoRA changes the output."""
    from diffusers import WanTransformer3DModel

    subject, clips = _data(channels=48)
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48,
                                  out_channels=48, text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2).eval()
    backbone = describe(model)
    for recipe in RECIPES:
        trained = RECIPES[recipe](backbone, subject, clips, SigmaSampler())
        history = trained[0].history if isinstance(trained, tuple) else trained.history
        assert len(history) == OPTIM.steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in history), recipe
