"""The StageBlender's weights over a sampling run (what the StageBlender Plot node draws), on a tiny diffusers Wan."""

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters.dualreal import DualAdapterPart, DualAdapterSpec, DualRealWeights
from custvid_core.adapters.parts import attached
from custvid_core.adapters.stage_blender import StageBlenderPart, dualreal_parts, weights_over_steps
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.media import series_plot


def _trained_looking(backbone, groups=2):
    """Exported DualReal parts with every weight moved off its initial value (the controller's last layer too)."""
    identity = DualAdapterPart("dr_identity", "identity", DualAdapterSpec(8))
    motion = DualAdapterPart("dr_motion", "motion", DualAdapterSpec(8, condition_dim=6))
    controller = StageBlenderPart("dr_controller", identity, motion, groups=groups)
    parts = [identity, motion, controller]
    g = torch.Generator().manual_seed(1)
    with attached(backbone, parts), torch.no_grad():
        for part in parts:
            for p in part.module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return DualRealWeights({role: p.export() for role, p in zip(("identity", "motion", "controller"), parts)})


def test_weights_over_steps_follow_an_euler_run_and_are_the_controllers_weights_at_each_step():
    backbone = describe(tiny_diffusers_wan(layers=3))
    weights = _trained_looking(backbone)
    g = torch.Generator().manual_seed(2)
    noise, context, c = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), torch.randn(1, 6)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    curve = weights_over_steps(backbone, dualreal_parts(weights), noise, sigmas, context, c)
    assert curve.shape == (3, 2) and ((curve > 0) & (curve < 0.2)).all()
    assert not torch.allclose(curve[0], curve[-1], atol=1e-4)

    # The same run by hand: the controller's weights at each step's input, the latent moved by Euler steps.
    parts = dualreal_parts(weights)
    x, expected = noise, []
    with torch.no_grad(), attached(backbone, parts):
        parts[1].set_condition(c)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = backbone.forward(x, s.view(1), context)
            expected.append(parts[2].identity_weights()[0])
            x = x + (s_next - s) * v
    assert torch.allclose(curve, torch.stack(expected), atol=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())


def test_without_a_controller_there_is_nothing_to_plot():
    backbone = describe(tiny_diffusers_wan())
    weights = _trained_looking(backbone)
    del weights.parts["controller"]
    with pytest.raises(InputError, match="dualreal: has no StageBlender controller"):
        weights_over_steps(backbone, dualreal_parts(weights), torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0, 0.0]),
                           torch.randn(1, 5, 64), torch.randn(1, 6))


def test_series_plot_draws_each_column_in_its_own_colour():
    values = torch.stack([torch.linspace(0.05, 0.15, 10), torch.linspace(0.15, 0.05, 10)], dim=1)
    image = series_plot(values, ["blocks 0-1", "blocks 2-2"], "identity weight")
    assert image.shape == (1, 256, 512, 3)
    colours = {tuple(p) for p in (image[0] * 255).round().int().reshape(-1, 3).tolist()}
    assert {(31, 119, 180), (255, 127, 14)} <= colours and (44, 160, 44) not in colours
