"""Image helpers with known answers."""

import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.images import fill_region, hue_rotations, moving_photos, slide_subject, straight_slides


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


def _photo(size=24, box=(8, 14, 6, 12)):
    """A red square (rows y0:y1, columns x0:x1) on a left-to-right grey ramp, and its mask."""
    y0, y1, x0, x1 = box
    image = torch.linspace(0.2, 0.6, size).expand(size, size)[..., None].repeat(1, 1, 3)
    mask = torch.zeros(size, size)
    mask[y0:y1, x0:x1] = 1
    image[mask > 0] = torch.tensor([1.0, 0.0, 0.0])
    return image, mask


def _centre(mask):
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


def test_fill_region_replaces_the_subject_with_its_surroundings():
    image, mask = _photo()
    given = image.clone()
    filled = fill_region(image, mask)
    assert torch.equal(image, given)
    ramp = torch.linspace(0.2, 0.6, 24)
    # No red left; the hole takes the ramp's values around it (a ramp diffuses into itself).
    assert float((filled[..., 0] - filled[..., 1]).abs().max()) < 1e-5
    assert torch.allclose(filled[10, :, 1], ramp, atol=0.02)
    outside = fill_region(image, mask, margin=1) == image
    assert outside[0].all() and outside[:, 0].all()
    with pytest.raises(InputError, match="whole photo"):
        fill_region(image, torch.ones(24, 24))


def test_straight_slides_keep_the_subject_inside_the_photo_at_the_asked_length():
    _, mask = _photo()
    g = torch.Generator().manual_seed(0)
    paths = straight_slides(mask, 5, (0.25, 0.25), 8, g)
    assert paths.shape == (8, 5, 2)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    for path in paths:
        length = float((path[-1] - path[0]).norm())
        steps = path[1:] - path[:-1]
        assert length == pytest.approx(0.25 * 24, rel=1e-4)  # 6 px fits in this photo in every direction
        assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-5)  # straight, at one speed
        assert float(xs.min() + path[:, 0].min()) >= 0 and float(xs.max() + path[:, 0].max()) <= 23
        assert float(ys.min() + path[:, 1].min()) >= 0 and float(ys.max() + path[:, 1].max()) <= 23
    # A path longer than the room is shortened to fit.
    long = straight_slides(mask, 5, (2.0, 2.0), 4, g)
    assert all(float((p[-1] - p[0]).norm()) < 2.0 * 24 for p in long)
    with pytest.raises(InputError, match="frames"):
        straight_slides(mask, 1, (0.1, 0.2), 1, g)


def test_slide_subject_moves_the_subject_and_its_mask_over_the_filled_background():
    image, mask = _photo()
    offsets = torch.tensor([[0.0, 0.0], [2.0, 1.0], [4.0, 2.0]])
    frames, masks = slide_subject(image, mask, offsets)
    assert frames.shape == (3, 24, 24, 3) and masks.shape == (3, 24, 24)
    assert torch.equal(masks[0], mask) and torch.allclose(frames[0][mask > 0], image[mask > 0], atol=1e-5)
    for f, m, o in zip(frames, masks, offsets):
        assert torch.allclose(_centre(m), _centre(mask) + o)
        assert m.sum() == mask.sum()
        red = (f[..., 0] > 0.9) & (f[..., 1] < 0.1)
        assert torch.equal(red, m > 0)  # the subject is where its mask is, and only there
    clips, clip_masks = moving_photos([image, image], [mask, mask], 3, 5, (0.2, 0.3), seed=1)
    assert clips.shape == (6, 5, 24, 24, 3) and clip_masks.shape == (6, 5, 24, 24)
    again, _ = moving_photos([image, image], [mask, mask], 3, 5, (0.2, 0.3), seed=1)
    assert torch.equal(clips, again)
    travelled = [float((_centre(m[-1]) - _centre(m[0])).norm()) for m in clip_masks]
    assert all(0.2 * 24 - 1.5 <= t <= 0.3 * 24 + 1.5 for t in travelled)  # whole pixels: within a pixel or so
