import pytest
import torch
from builders import moving_square_clip
from torch import nn

from custvid_core.errors import InputError
from custvid_core.representations.motion import (
    RaftEncoder,
    build_raft,
    compute_flow,
    extract_motion,
    flow_preview,
    load_raft,
)
from custvid_core.representations.storage import load_representation, save_representation

quiet = dict(progress=lambda done, total: None)


class UniformFlow(nn.Module):
    """Stands in for the flow network: every pixel moves by `step` at the size it is given,
    so the resize and rescale around RAFT can be checked against exact numbers."""

    def __init__(self, step):
        super().__init__()
        self.step = step
        self.anchor = nn.Parameter(torch.zeros(()))
        self.sizes = []

    def forward(self, image1, image2, num_flow_updates=12):
        self.sizes.append(tuple(image1.shape[-2:]))
        n, _, h, w = image1.shape
        return [torch.tensor(self.step, dtype=torch.float32).view(1, 2, 1, 1).expand(n, 2, h, w)]


@pytest.mark.parametrize("size, max_side, work, scale", [
    ((32, 32), 512, (128, 128), 0.25),      # small clips are upscaled for RAFT
    ((1024, 512), 512, (512, 256), 2.0),    # large clips are downscaled
    ((130, 250), 512, (128, 248), None),    # sizes snap to multiples of 8
])
def test_flow_is_mapped_back_to_the_clip_size(size, max_side, work, scale):
    net = UniformFlow((4.0, -2.0))
    flow = compute_flow(RaftEncoder(net, "test", "test"), torch.rand(3, *size, 3), max_side=max_side, **quiet)
    assert flow.shape == (2, 2, *size)
    assert set(net.sizes) == {work}
    sx, sy = size[1] / work[1], size[0] / work[0]
    assert torch.allclose(flow[:, 0], torch.full_like(flow[:, 0], 4.0 * sx))
    assert torch.allclose(flow[:, 1], torch.full_like(flow[:, 1], -2.0 * sy))
    if scale is not None:
        assert sx == pytest.approx(scale)


def test_pairs_are_batched_and_batching_does_not_change_results(tiny_raft):
    clip, _ = moving_square_clip(frames=6)
    net = UniformFlow((1.0, 0.0))
    compute_flow(RaftEncoder(net, "test", "test"), clip, batch_size=4, **quiet)
    assert len(net.sizes) == 2  # 5 pairs in two calls, not five
    one = extract_motion(tiny_raft, clip, batch_size=1, iterations=3, **quiet)
    many = extract_motion(tiny_raft, clip, batch_size=5, iterations=3, **quiet)
    assert one.flow.shape == (5, 2, 40, 56)
    assert torch.allclose(one.flow, many.flow, atol=1e-4)


def test_object_descriptor_follows_the_masks():
    clip, masks = moving_square_clip(frames=4, size=(40, 56), step=(3, 1), side=10)
    net = UniformFlow((0.0, 0.0))
    rep = extract_motion(RaftEncoder(net, "test", "test"), clip, masks, **quiet)
    # Square at x = 5 + 3f .. +10, y = 5 + f .. +10: its centre is (10 + 3f, 10 + f).
    expected = torch.tensor([[(10 + 3 * f) / 56, (10 + f) / 40] for f in range(4)])
    assert torch.allclose(rep.trajectory, expected, atol=1e-5)
    assert rep.subject_from == "masks"


def test_without_masks_the_subject_is_the_moving_region():
    class MovingPatch(UniformFlow):
        def forward(self, image1, image2, num_flow_updates=12):
            n, _, h, w = image1.shape
            flow = torch.zeros(n, 2, h, w)
            flow[:, 0, : h // 2, : w // 2] = 8.0  # only the top-left quarter moves, 8 px right
            return [flow]

    rep = extract_motion(RaftEncoder(MovingPatch((0.0, 0.0)), "test", "test"), torch.rand(3, 128, 128, 3), **quiet)
    assert rep.subject_from == "flow"
    assert torch.allclose(rep.object_flow, torch.tensor([[8.0 / 128, 0.0]] * 2), atol=1e-6)
    assert torch.allclose(rep.trajectory[0], torch.tensor([0.25, 0.25]), atol=1e-6)
    assert torch.allclose(rep.trajectory[-1], torch.tensor([0.25 + 8 / 128, 0.25]), atol=1e-6)


def test_flow_preview_is_an_image_batch_with_one_scale(tiny_raft):
    clip, masks = moving_square_clip()
    rep = extract_motion(tiny_raft, clip, masks, iterations=2, **quiet)
    preview = flow_preview(rep)
    assert preview.shape == (3, 40, 56, 3) and 0 <= preview.min() and preview.max() <= 1
    rep.flow = torch.zeros_like(rep.flow)
    rep.flow[1, 0] = 5.0
    preview = flow_preview(rep)
    assert torch.allclose(preview[0], torch.ones_like(preview[0]))  # no motion: white
    assert not torch.allclose(preview[1], torch.ones_like(preview[1]))


def test_saved_form_loads_back_identically(tiny_raft, tmp_path):
    clip, masks = moving_square_clip()
    rep = extract_motion(tiny_raft, clip, masks, iterations=2, **quiet)
    back = load_representation(save_representation(rep, tmp_path / "m.safetensors"), "motion")
    for name in ("flow", "object_flow", "trajectory"):
        assert torch.equal(getattr(back, name), getattr(rep, name))
    assert (back.encoder, back.iterations, back.subject_from) == (rep.encoder, rep.iterations, rep.subject_from)


@pytest.mark.parametrize("variant", ["raft_small", "raft_large"])
def test_loads_either_variant_from_pth_or_safetensors(variant, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    raft = build_raft(variant)
    sd = raft.model.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        loaded = load_raft(path)
        assert loaded.variant == variant
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), sd.values()))


def test_weights_of_another_architecture_are_refused(tiny_dino, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(tiny_dino.model.state_dict(), path)
    with pytest.raises(InputError, match="raft_path: 'dino.pth' matches neither RAFT architecture"):
        load_raft(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=torch.rand(1, 32, 32, 3)), "frames: only 1 given. Expected at least 2 images"),
    (dict(frames=[torch.rand(32, 32, 3), torch.rand(32, 40, 3)]), "frames: frames have different sizes"),
    (dict(frames=torch.rand(3, 32, 32, 3), masks=torch.ones(2, 32, 32)), "masks: 2 masks were given for 3"),
    (dict(frames=torch.rand(3, 32, 32, 3), masks=torch.zeros(3, 32, 32)), "masks: mask 0 is empty"),
    (dict(frames=torch.rand(2, 32, 32, 3), iterations=0), "iterations"),
    (dict(frames=torch.rand(2, 32, 32, 3), max_side=10**6), "max_side"),
])
def test_bad_input_names_the_input(tiny_raft, kwargs, match):
    with pytest.raises(InputError, match=match):
        extract_motion(tiny_raft, **kwargs, **quiet)
