"""Box steering: box tracks, token roles and the cross-attention logit bias, with known answers."""

import math

import pytest
import torch

from custvid_core.control.boxes import SUPPRESS, AttentionEdit, BoxSteering, BoxTrack, TokenRoles, word_positions
from custvid_core.control.sampling import SamplingControl, SamplingStep, cross_attention_hook
from custvid_core.errors import InputError
from custvid_core.media import draw_boxes
from custvid_core.world.model import DEFAULT_CONFIG, build_world


def test_box_tracks_interpolate_keyframes_and_read_masks():
    track = BoxTrack.parse("0: 0, 0, 0.5, 0.5\n1: 0.5, 0.5, 1, 1")
    assert torch.allclose(track.per_frame(3)[1], torch.tensor([0.25, 0.25, 0.75, 0.75]))
    assert BoxTrack.parse(track.to_json()) == track
    assert torch.allclose(BoxTrack.parse("[[0, 0, 0.2, 0.2], [0.4, 0, 0.6, 0.2], [0.8, 0, 1, 0.2]]").at(0.25),
                          torch.tensor([0.2, 0.0, 0.4, 0.2]))
    masks = torch.zeros(3, 10, 20)
    masks[0, 2:5, 4:10] = 1
    masks[2, 5:10, 10:20] = 1  # frame 1 empty: skipped, then interpolated
    from_masks = BoxTrack.from_masks(masks)
    assert torch.allclose(from_masks.at(0.0), torch.tensor([0.2, 0.2, 0.5, 0.5]))
    assert torch.allclose(from_masks.at(1.0), torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(from_masks.at(0.5), torch.tensor([0.35, 0.35, 0.75, 0.75]))


@pytest.mark.parametrize("text", ["0: 0, 0, 1.2, 1", "0: 0.5, 0, 0.4, 1", "0: 0, 0, 1", "1: 0,0,1,1\n0: 0,0,1,1", ""])
def test_bad_boxes_are_refused_by_name(text):
    with pytest.raises(InputError) as e:
        BoxTrack.parse(text)
    assert e.value.input_name == "boxes"


def test_logit_bias_boosts_the_subject_in_its_box_before_tau_and_suppresses_other_words():
    # Two latent frames of 2x4 tokens; the box is the left half on frame 0 and the right half on frame 1.
    track = BoxTrack.parse("0: 0, 0, 0.5, 1\n1: 0.5, 0, 1, 1")
    roles = TokenRoles(subject=(1,), prompt=(0, 1, 2, 3), background=(3,))
    steering = BoxSteering(track, roles, alpha=10.0, tau=0.3)
    bias = steering.logit_bias((2, 2, 4), key_length=6, progress=0.1).view(2, 2, 4, 6)
    boost = 10.0 * (1 - 0.5)
    assert torch.equal(bias[0, :, :2, 1], torch.full((2, 2), boost)) and torch.equal(bias[0, :, 2:, 1], torch.zeros(2, 2))
    assert torch.equal(bias[1, :, 2:, 1], torch.full((2, 2), boost)) and torch.equal(bias[1, :, :2, 1], torch.zeros(2, 2))
    assert (bias[..., [0, 2]] == SUPPRESS).all()  # other prompt words
    assert torch.equal(bias[..., 4:], torch.zeros(2, 2, 4, 2))  # padding untouched
    assert (bias[0, :, :2, 3] == SUPPRESS).all() and (bias[0, :, 2:, 3] == 0).all()  # background outside only
    late = steering.logit_bias((2, 2, 4), key_length=6, progress=0.5).view(2, 2, 4, 6)
    assert (late[..., 1] == 0).all() and (late[..., 0] == SUPPRESS).all()
    # With a background phrase the late edit stays a bias (it depends on the query); without one it keeps keys.
    assert steering.edit((2, 2, 4), 6, 0.5).bias is not None
    plain_roles = TokenRoles(subject=(1,), prompt=(0, 1, 2, 3))
    late_edit = BoxSteering(track, plain_roles, tau=0.3).edit((2, 2, 4), 6, 0.5)
    assert late_edit.bias is None and late_edit.keep.tolist() == [1, 4, 5]
    assert BoxSteering(track, plain_roles, tau=0.3).edit((2, 2, 4), 6, 0.1).bias is not None


def test_steering_inputs_are_checked_by_name():
    track = BoxTrack.parse("0: 0, 0, 1, 1")
    for kwargs, name in (({"alpha": -1.0}, "alpha"), ({"tau": 1.5}, "tau")):
        with pytest.raises(InputError) as e:
            BoxSteering(track, TokenRoles((0,), (0,)), **kwargs)
        assert e.value.input_name == name
    with pytest.raises(InputError, match="'dog' is not in the prompt"):
        word_positions([5, 6, 7], {"dog": [9]}, "subject_words", "a red cat")
    assert word_positions([5, 6, 7, 6, 7], {"cat": [6, 7]}, "subject_words", "p") == (1, 2, 3, 4)


def test_a_suppressing_bias_and_kept_keys_equal_dropping_the_suppressed_words_in_the_edited_row_only():
    # Wan's text keys carry no positions, so suppressing words must equal leaving them out of the context.
    world = build_world({**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64})
    with torch.no_grad():
        for p in world.backbone.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 8, generator=g)
    context = torch.randn(2, 6, 4096, generator=g)

    class Edit(SamplingControl):
        def __init__(self, make):
            self.make = make

        def attention_edit(self, step, call):
            return {0: self.make(call)}

    def suppress(call):
        b = torch.zeros(math.prod(call.grid), call.key_length)
        b[:, 2:] = SUPPRESS
        return AttentionEdit(bias=b)

    def keep(call):
        return AttentionEdit(keep=torch.tensor([0, 1]))

    step = SamplingStep(0, 1, 0.5, 0.0, (0,))
    with torch.no_grad():
        outputs = []
        for make in (suppress, keep):
            hook = cross_attention_hook(Edit(make), lambda: step, world.backbone.token_grid(x.shape))
            with world.backbone.text_cross_attention(hook):
                outputs.append(world.backbone.forward(x, 0.5, context))
        dropped = world.backbone.forward(x[:1], 0.5, context[:1, :2])
        plain = world.backbone.forward(x, 0.5, context)
    for steered in outputs:
        assert torch.allclose(steered[:1], dropped, atol=1e-5)
        assert torch.allclose(steered[1], plain[1], atol=1e-5)  # the other row is untouched
        assert not torch.allclose(steered[0], plain[0], atol=1e-3)
    with torch.no_grad():  # and the processors are restored on exit
        assert torch.equal(world.backbone.forward(x, 0.5, context), plain)


def test_boxes_are_outlined_on_a_copy_of_the_frames():
    frames = torch.zeros(2, 8, 8, 3)
    out = draw_boxes(frames, torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.5, 1.0]]), width=1)
    outline = torch.zeros(8, 8, dtype=torch.bool)
    outline[2:6, 2:6] = True
    outline[3:5, 3:5] = False
    assert torch.equal(out[0].amax(-1) > 0, outline)
    assert out[1, 4, 0:4].amax() > 0 and out[1, 7, 0:4].amax() > 0 and out[1, 0:4].amax() == 0
    assert frames.abs().sum() == 0

