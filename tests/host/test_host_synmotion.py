"""SynMotion's dual embeddings on ComfyUI's own WanModel (in-process from COMFYUI_PATH): they edit the text where
it enters the model as on diffusers' Wan, and each group learns alone."""

import torch
from comfy_host import import_pack
from test_host_backbone import TINY, tiny_pair

from custvid_core.adapters.parts import attached
from custvid_core.adapters.synmotion import RolePositions, SynMotionEmbeddingPart
from custvid_core.training.loop import OptimSettings, StepResult, train

POSITIONS = RolePositions(subject=(0, 1), motion=(2, 3))


def _part():
    phrase = torch.randn(2, TINY["text_dim"], generator=torch.Generator().manual_seed(1))
    return SynMotionEmbeddingPart("syn", POSITIONS, TINY["text_dim"], phrase, "red circle", "moving left")


def test_the_embeddings_act_alike_on_comfyuis_wan_and_diffusers_and_learn_by_group():
    import_pack().nodes.host.enable_rope_backward()  # as the pack's training does, for comfy-kitchen's fused RoPE
    native, theirs = tiny_pair()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 2, 6, 8, generator=g), torch.randn(1, 6, TINY["text_dim"], generator=g)
    with torch.no_grad():
        before = native.forward(x, 0.4, context)
    outputs = []
    for backbone in (native, theirs):
        part = _part()
        with torch.no_grad(), attached(backbone, [part]):
            if backbone is native:  # at first the model sees the text encoder's conditioning
                assert torch.equal(backbone.forward(x, 0.4, context), before)
            for layer in (part.module.subject.project, part.module.motion.project, part.module.refiner.out):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2)))
            outputs.append(backbone.forward(x, 0.4, context))
    assert not torch.allclose(outputs[0], before, atol=1e-3)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)

    part = _part()
    with attached(native, [part]):
        groups = part.groups()
        start = [p.detach().clone() for p in groups["syn_motion"]]
        train(lambda i, g: StepResult(native.forward(x, 0.4, context).pow(2).mean(), update=("syn_subject",)),
              groups, OptimSettings(steps=2, lr=1e-2, warmup=0))
        assert all(torch.equal(p, s) for p, s in zip(groups["syn_motion"], start))
        assert part.module.subject.project.weight.abs().max() > 0
    with torch.no_grad():
        assert torch.equal(native.forward(x, 0.4, context), before)
