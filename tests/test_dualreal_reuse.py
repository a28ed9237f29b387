"""A trained DualReal attached for every model call (as Apply DualReal's sampling does) builds its modules once per
device and dtype, with the same outputs as parts built afresh; parts in training start from their seed every time."""

import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters import dualreal as dualreal_module
from custvid_core.adapters import stage_blender as stage_blender_module
from custvid_core.adapters.dualreal import DualAdapterPart, DualAdapterSpec
from custvid_core.adapters.parts import attached
from custvid_core.adapters.stage_blender import dualreal_parts
from custvid_core.backbones import describe
from custvid_core.training import OptimSettings, SubjectSet, VideoSet
from custvid_core.training.dualreal import DualRealSettings, ImageEmbeddings, dualreal_weights, train_dualreal

BLOCKS = 3


def _trained(backbone):
    g = torch.Generator().manual_seed(0)
    subject = SubjectSet(torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g))
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    embeddings = ImageEmbeddings(torch.randn(2, 12, generator=g), torch.randn(1, 12, generator=g))
    settings = DualRealSettings(bottleneck=8, optim=OptimSettings(steps=3, lr=1e-2, warmup=1, schedule="constant"))
    return dualreal_weights(train_dualreal(backbone, subject, clips, settings, embeddings)), embeddings.subject


def _counting_builds(monkeypatch) -> list[str]:
    built = []
    for module in (dualreal_module, stage_blender_module):
        original = module.built_unseeded

        def counting(make, _original=original):
            made = _original(make)
            built.append(type(made).__name__)
            return made

        monkeypatch.setattr(module, "built_unseeded", counting)
    return built


def _call(backbone, parts, reference, x, context):
    with torch.no_grad(), attached(backbone, parts):
        parts[1].set_condition(reference)
        return backbone.forward(x, torch.tensor([0.7, 0.3]), context)


def test_loaded_parts_are_built_once_per_dtype_and_compute_what_fresh_parts_compute(monkeypatch):
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    weights, reference = _trained(backbone)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)
    built = _counting_builds(monkeypatch)
    parts = dualreal_parts(weights)
    calls = [_call(backbone, parts, reference, x, context) for _ in range(4)]
    assert sorted(built) == ["BlockAdapters", "BlockAdapters", "StageBlender"]
    fresh = _call(backbone, dualreal_parts(weights), reference, x, context)
    assert all(torch.equal(c, fresh) for c in calls)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())

    # Another dtype builds them again, in that dtype (bf16 adapters on the fp32 model: close, not equal).
    built.clear()
    for part in parts:
        part.dtype = torch.bfloat16
    in_bf16 = [_call(backbone, parts, reference, x, context) for _ in range(2)]
    assert len(built) == 3 and parts[0]._kept[1].blocks[0]["ffn"].down.weight.dtype == torch.bfloat16
    assert torch.equal(in_bf16[0], in_bf16[1])
    assert not torch.equal(in_bf16[0], fresh) and torch.allclose(in_bf16[0], fresh, atol=2e-2)
    for part in parts:
        part.dtype = torch.float32
    assert torch.equal(_call(backbone, parts, reference, x, context), fresh) and len(built) == 6


def test_a_part_in_training_starts_from_its_seed_at_every_attach():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    part = DualAdapterPart("dr_identity", "identity", DualAdapterSpec(8), seed=1)
    with attached(backbone, [part]):
        first = {k: v.clone() for k, v in part.module.state_dict().items()}
        with torch.no_grad():
            for p in part.module.parameters():
                p.add_(1.0)
    with attached(backbone, [part]):
        again = part.module.state_dict()
        assert all(torch.equal(first[k], again[k]) for k in first)


def test_training_computes_no_gradient_for_the_base_model_and_leaves_its_flags_as_they_were():
    """The base weights are not trained: a gradient for them (the model's size again) would be computed at every
    step and left on the user's model."""
    model = tiny_diffusers_wan(BLOCKS)
    model.blocks[0].ffn.net[2].weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert sum(flags.values()) > 1  # as a model fresh from its constructor (or ComfyUI's loader) comes
    _trained(describe(model))
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
