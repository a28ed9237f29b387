"""Image helpers with known answers."""

import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.images import hue_rotations


def test_hue_rotations_turn_colours_evenly_round_the_circle_and_keep_the_original():
    frames = torch.zeros(2, 4, 4, 3)
    frames[..., 0] = 1.0  # pure red
    given = frames.clone()
    versions = hue_rotations(frames, 2)
    assert len(versions) == 3 and versions[0] is frames and torch.equal(frames, given)
    # A third of a turn makes red green, two thirds make it blue.
    assert torch.allclose(versions[1], torch.tensor([0.0, 1.0, 0.0]).expand(2, 4, 4, 3), atol=1e-5)
    assert torch.allclose(versions[2], torch.tensor([0.0, 0.0, 1.0]).expand(2, 4, 4, 3), atol=1e-5)
    # Grey has no hue to turn.
    grey = torch.full((1, 2, 2, 3), 0.4)
    assert all(torch.allclose(v, grey, atol=1e-6) for v in hue_rotations(grey, 3))
    assert hue_rotations(frames, 0) == [frames]
    with pytest.raises(InputError) as e:
        hue_rotations(frames, -1)
    assert e.value.input_name == "hue_copies"
