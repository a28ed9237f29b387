"""The shapes world's generator: deterministic clips whose ground truth is exact."""

import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.world.scene import (
    DIRECTIONS,
    SEEN_COLOURS,
    SEEN_SHAPES,
    Scene,
    WorldSpec,
    mask_boxes,
    path_centres,
    random_scene,
    render,
    scene_from_dict,
)


def test_rendering_is_deterministic_and_seeded():
    a = render(random_scene(torch.Generator().manual_seed(5)))
    b = render(random_scene(torch.Generator().manual_seed(5)))
    c = render(random_scene(torch.Generator().manual_seed(6)))
    assert torch.equal(a.frames, b.frames) and a.prompt == b.prompt
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (WorldSpec().frames, 32, 32, 3) and a.masks.shape == (WorldSpec().frames, 32, 32)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_straight_motion_ground_truth(direction):
    scene = Scene(shape="square", direction=direction, start=(16.0, 16.0), speed=1.5, object_size=10)
    clip = render(scene)
    dx, dy = DIRECTIONS[direction]
    expected = torch.tensor([[16 + dx * 1.5 * f, 16 + dy * 1.5 * f] for f in range(WorldSpec().frames)]) / 32
    assert torch.allclose(clip.centres / 32, expected)
    # The mask centroid follows the path to within the pixel grid's rounding.
    assert (clip.centroids - expected).abs().max() < 0.5 / 32 + 1e-6
    # Boxes: a 0.9 * 10 px square, whole pixels.
    widths = (clip.boxes[:, 2] - clip.boxes[:, 0]) * 32
    assert widths.min() >= 8 and widths.max() <= 10
    assert clip.prompt.endswith(f"moving {direction}")


def test_masks_mark_exactly_the_object_colour():
    clip = render(Scene(colour="green", shape="circle", start=(16, 16), object_size=14))
    inside = clip.frames[0][clip.masks[0] > 0.5]
    outside = clip.frames[0][clip.masks[0] < 0.5]
    assert (inside[:, 1] > 0.5).float().mean() > 0.9  # green
    assert outside.max() < 0.5  # the wallpaper is dim
    assert clip.masks[0].sum() == pytest.approx(3.14159 * 7 ** 2, rel=0.1)


def test_background_offset_and_camera_pan_are_exact():
    still = render(Scene(background_offset=(3.0, 5.0), start=(8, 8), object_size=8))
    panned = render(Scene(background_offset=(3.0, 5.0), camera=(2.0, -1.0), start=(8, 8), object_size=8))
    assert torch.equal(panned.background_offsets[3], torch.tensor([9.0, 2.0]))
    # Frame 3 of the pan shows the wallpaper 6 px further right and 3 px further up: compare away from the object.
    shifted = render(Scene(background_offset=(9.0, 2.0), start=(8, 8), object_size=8))
    assert torch.allclose(panned.frames[3, 16:, 16:], shifted.frames[0, 16:, 16:], atol=1e-5)
    assert torch.equal(still.frames[0, 16:, 16:], still.frames[-1, 16:, 16:])


def test_random_scenes_cover_the_vocabulary_and_keep_objects_in_frame():
    g = torch.Generator().manual_seed(0)
    spec = WorldSpec()
    seen = {"colour": set(), "shape": set(), "direction": set(), "texture": set()}
    for _ in range(300):
        s = random_scene(g, spec)
        for k in seen:
            seen[k].add(getattr(s, k))
        c = path_centres(s, spec.frames, spec.size)
        half = s.object_size / 2
        assert c.min() >= half - 1e-4 and c.max() <= spec.size - half + 1e-4
        assert spec.speed[0] <= s.speed <= spec.speed[1]
    assert seen["colour"] == set(SEEN_COLOURS) and seen["shape"] == set(SEEN_SHAPES)
    assert seen["direction"] == set(DIRECTIONS) and seen["texture"] == {"plain", "striped"}


def test_centred_scenes_put_the_path_midpoint_within_the_jitter_of_the_centre():
    g = torch.Generator().manual_seed(0)
    spec = WorldSpec()
    offsets = []
    for _ in range(200):
        s = random_scene(g, spec, centred_jitter=2.0)
        c = path_centres(s, spec.frames, spec.size)
        offsets.append((c[0] + c[-1]) / 2 - spec.size / 2)
        half = s.object_size / 2
        assert c.min() >= half - 2 - 1e-4 and c.max() <= spec.size - half + 2 + 1e-4  # at most the jitter out
    offsets = torch.stack(offsets)
    assert offsets.abs().max() <= 2.0 + 1e-5 and offsets.abs().max() > 1.5  # the jitter is used, not exceeded
    exact = random_scene(g, spec, centred_jitter=0.0)
    c = path_centres(exact, spec.frames, spec.size)
    assert torch.allclose((c[0] + c[-1]) / 2, torch.tensor([16.0, 16.0]))


@pytest.mark.parametrize("path, params", [
    ("circle", {"center": (16, 16)}),
    ("zigzag", {"amplitude": 4.0, "zigs": 2.0}),
    ("bounce", {"velocity": (5.0, 3.0)}),
    ("keyframes", {"points": [[0.3, 0.3], [0.7, 0.3], [0.7, 0.7]]}),
])
def test_unseen_paths(path, params):
    scene = Scene(path=path, direction="right", start=(10.0, 16.0), speed=2.0, object_size=10, path_params=params)
    c = path_centres(scene, 9, 32)
    if path == "circle":
        r = (c - 16).norm(dim=1)
        assert torch.allclose(r, torch.full_like(r, 6.0), atol=1e-4)
        assert torch.allclose(c[0], c[-1], atol=1e-4)  # one full turn
    elif path == "zigzag":
        assert torch.allclose(c[:, 0], 10 + 2.0 * torch.arange(9.0))
        assert c[:, 1].max() - c[:, 1].min() == pytest.approx(8.0, abs=1e-4)
    elif path == "bounce":
        assert c.min() >= 5 - 1e-4 and c.max() <= 27 + 1e-4  # reflected at the walls
        assert (c[1:, 0] - c[:-1, 0]).abs().max() <= 5.0 + 1e-4
    else:
        assert torch.allclose(c[0], torch.tensor([0.3, 0.3]) * 32) and torch.allclose(c[4], torch.tensor([0.7, 0.3]) * 32)
        assert torch.allclose(c[-1], torch.tensor([0.7, 0.7]) * 32)
    assert render(scene).scene.prompt() == "red circle"  # no direction words for paths beyond straight


def test_mask_boxes_are_tight():
    masks = torch.zeros(2, 10, 20)
    masks[0, 2:5, 3:9] = 1
    boxes = mask_boxes(masks)
    assert torch.allclose(boxes[0], torch.tensor([3 / 20, 2 / 10, 9 / 20, 5 / 10]))
    assert torch.equal(boxes[1], torch.zeros(4))


def test_scene_fields_are_validated_by_name():
    with pytest.raises(InputError, match="colour: 'teal' is not in the shapes world"):
        render(Scene(colour="teal"))
    with pytest.raises(InputError, match="speedd: is not a scene field"):
        scene_from_dict({"speedd": 2})
    assert scene_from_dict({"colour": "orange", "shape": "star", "start": [4, 5]}).start == (4, 5)


def test_the_wallpaper_contrast_scales_the_background_waves_and_nothing_else():
    scene = Scene(colour="red", shape="square", background_seed=7)
    low, high = render(scene, WorldSpec()), render(scene, WorldSpec(wallpaper_contrast=0.07))
    near_object = torch.nn.functional.max_pool2d(low.masks[:1], 5, 1, 2)[0] > 0  # edge pixels mix colours
    background = ~near_object
    spread = [float(c.frames[0][background].mean(-1).std()) for c in (low, high)]
    assert spread[1] / spread[0] == pytest.approx(2.0, rel=0.05)
    assert torch.equal(low.masks, high.masks)
    inside = low.masks[0] > 0.5
    assert torch.allclose(low.frames[0][inside], high.frames[0][inside], atol=0.05)
