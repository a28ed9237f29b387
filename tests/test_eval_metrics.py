"""The metrics on inputs with known answers: identical frames, a known pan, a static clip, a reference against itself."""

import math

import pytest
import torch
from builders import moving_square_clip

from custvid_core.control.camera import CameraPath
from custvid_core.eval import metrics
from custvid_core.images import mask_boxes


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _texture(h, w, shift_x=0.0, shift_y=0.0):
    """A smooth periodic texture `[H, W, 3]` moved by (shift_x, shift_y) pixels (exact for any shift)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    u, v = 2 * math.pi * (xs - shift_x) / w, 2 * math.pi * (ys - shift_y) / h
    return torch.stack([0.5 + 0.2 * torch.sin(u), 0.5 + 0.2 * torch.cos(v), 0.5 + 0.1 * torch.sin(u + v)], -1)


def _uniform_flow(pairs, h, w, dx, dy):
    flow = torch.zeros(pairs, 2, h, w)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_appearance_scores_of_identical_and_unrelated_features():
    g = torch.Generator().manual_seed(0)
    frame = _unit(torch.randn(1, 32, generator=g))
    frames = frame.expand(6, 32)
    assert metrics.mean_cosine(frames, frame) == pytest.approx(1.0)
    assert metrics.temporal_consistency(frames) == pytest.approx(1.0)
    other = _unit(torch.randn(1, 32, generator=g))
    orthogonal = _unit(other - (other @ frame.T) * frame)
    assert metrics.mean_cosine(frames, orthogonal) == pytest.approx(0.0, abs=1e-6)
    alternating = torch.cat([frame, orthogonal] * 3)
    assert metrics.temporal_consistency(alternating) == pytest.approx(0.0, abs=1e-6)
    assert metrics.mean_cosine(alternating, frame) == pytest.approx(0.5)
    assert math.isnan(metrics.temporal_consistency(frame))


def test_region_crops_cut_the_box_out_as_a_square():
    images = torch.rand(2, 40, 60, 3, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[20 / 60, 10 / 40, 30 / 60, 20 / 40], [0.0, 0.0, 10 / 60, 10 / 40]])
    crops = metrics.region_crops(images, boxes, 10)
    assert torch.allclose(crops[0], images[0, 10:20, 20:30], atol=1e-6)
    assert torch.allclose(crops[1], images[1, :10, :10], atol=1e-6)
    # A wide box is widened to a square about its centre: its top and bottom rows come from outside the frame.
    wide = metrics.region_crops(images[:1], torch.tensor([[0.0, 0.0, 20 / 60, 10 / 40]]), 20)[0]
    assert torch.allclose(wide[5:15, :], images[0, :10, :20], atol=1e-6)
    assert float(wide[:4].abs().max()) == 0.0


def test_flicker_is_the_change_of_static_pixels():
    frames = _texture(16, 16)[None].repeat(5, 1, 1, 1)
    still = torch.zeros(4, 2, 16, 16)
    assert metrics.flicker(frames, still) == 0.0
    flickering = frames.clone()
    flickering[1::2] += 0.1  # every other frame brighter: each pair changes by 0.1 everywhere
    assert metrics.flicker(flickering, still) == pytest.approx(0.1, abs=1e-5)
    # Pixels the flow says move are not flicker: the left half moves and changes, the right half stands still.
    moving = flickering.clone()
    moving[:, :, :8] = torch.rand(5, 16, 8, 3, generator=torch.Generator().manual_seed(2))
    flow = still.clone()
    flow[:, 0, :, :8] = 2.0
    assert metrics.flicker(moving, flow) == pytest.approx(0.1, abs=1e-5)
    assert metrics.flicker(moving, None) > 0.15  # without a flow every pixel counts


def test_motion_smoothness_is_one_for_a_still_clip_and_a_steady_pan_and_lower_for_jerks():
    h, w = 24, 32
    still = _texture(h, w)[None].repeat(6, 1, 1, 1)
    assert metrics.motion_smoothness(still, torch.zeros(5, 2, h, w)) == pytest.approx(1.0)

    steady = torch.stack([_texture(h, w, 1.5 * t) for t in range(6)])
    smooth = metrics.motion_smoothness(steady, _uniform_flow(5, h, w, 1.5, 0.0))
    assert smooth > 0.995
    jerky_shifts = [0.0, 3.0, 0.0, 3.0, 0.0, 3.0]
    jerky = torch.stack([_texture(h, w, s) for s in jerky_shifts])
    flow = torch.stack([_uniform_flow(1, h, w, b - a, 0.0)[0] for a, b in zip(jerky_shifts, jerky_shifts[1:])])
    assert metrics.motion_smoothness(jerky, flow) < smooth - 0.02
    assert math.isnan(metrics.motion_smoothness(still[:2], torch.zeros(1, 2, h, w)))


def test_dynamic_degree_is_the_top_five_percent_of_flow_at_vbench_scale():
    assert metrics.dynamic_degree(torch.zeros(3, 2, 64, 128)) == 0.0
    # A uniform 3-4-5 flow on a 64-pixel-high frame is 5 pixels, 20 at VBench's 256-pixel side.
    assert metrics.dynamic_degree(_uniform_flow(3, 64, 128, 3.0, 4.0)) == pytest.approx(20.0)
    # Only the top 5% count: 10% of the pixels moving 2 px, the rest still.
    flow = torch.zeros(2, 2, 100, 256)
    flow[:, 0, :10] = 2.0
    assert metrics.dynamic_degree(flow) == pytest.approx(2.0 * 256 / 100)


def test_point_tracks_follow_the_flow():
    flow = _uniform_flow(4, 20, 30, 1.0, -0.5)
    tracks = metrics.point_tracks(flow, points_per_side=4)
    assert tracks.shape == (16, 5, 2)
    steps = tracks[:, 1:] - tracks[:, :-1]
    assert torch.allclose(steps, torch.tensor([1.0, -0.5]).expand_as(steps), atol=1e-5)
    # A square moving over a still background: points on it move with it, the others stay.
    clip, masks = moving_square_clip(frames=3, size=(40, 56), step=(3, 1), side=16)
    exact = torch.zeros(2, 2, 40, 56)
    exact[:, 0], exact[:, 1] = masks[:-1] * 3, masks[:-1] * 1
    tracks = metrics.point_tracks(exact, points_per_side=8)
    on_square = masks[0][tracks[:, 0, 1].round().long(), tracks[:, 0, 0].round().long()] > 0
    travel = tracks[:, -1] - tracks[:, 0]
    assert on_square.any() and (~on_square).any()
    assert torch.allclose(travel[on_square], torch.tensor([6.0, 2.0]), atol=1e-4)
    assert travel[~on_square].abs().max() < 1.5  # the grid points near the square's edge are dragged a little


def test_motion_fidelity_of_a_clip_against_itself_another_and_a_still_clip():
    g = torch.Generator().manual_seed(3)
    flow = torch.randn(5, 2, 8, 8, generator=g).cumsum(0)
    tracks = metrics.point_tracks(flow, points_per_side=6)
    assert metrics.motion_fidelity(tracks, (8, 8), tracks, (8, 8)) == pytest.approx(1.0)
    other = metrics.point_tracks(torch.randn(5, 2, 8, 8, generator=g).cumsum(0), points_per_side=6)
    assert metrics.motion_fidelity(tracks, (8, 8), other, (8, 8)) < 0.9
    # Opposite motion scores -1; the same motion at twice the size (tracks and frame scaled) is the same motion.
    right = metrics.point_tracks(_uniform_flow(4, 8, 8, 1.0, 0.0), 4)
    assert metrics.motion_fidelity(right * 2, (16, 16), right, (8, 8)) == pytest.approx(1.0)
    left = metrics.point_tracks(_uniform_flow(4, 8, 8, -1.0, 0.0), 4)
    assert metrics.motion_fidelity(right, (8, 8), left, (8, 8)) == pytest.approx(-1.0)
    still = metrics.point_tracks(torch.zeros(4, 2, 8, 8), 4)
    assert metrics.motion_fidelity(still, (8, 8), still, (8, 8)) == 1.0
    assert metrics.motion_fidelity(still, (8, 8), right, (8, 8)) == 0.0
    # A longer reference clip of the same steady motion compares on the shorter clip's frames.
    longer = metrics.point_tracks(_uniform_flow(8, 8, 8, 0.6, 0.0), 4)
    assert metrics.motion_fidelity(right, (8, 8), longer, (8, 8)) == pytest.approx(1.0)


def test_camera_flow_of_a_known_pan_and_zoom():
    # The camera moves right by a quarter of the frame over 5 frames: the scene moves left 2 px per pair.
    pan = CameraPath.constant(x=0.25)
    flow = metrics.camera_flow(pan, 5, (16, 32))
    assert flow.shape == (4, 2, 16, 32)
    assert torch.allclose(flow[:, 0], torch.full((4, 16, 32), -2.0), atol=1e-5)
    assert flow[:, 1].abs().max() < 1e-5
    zoom = metrics.camera_flow(CameraPath.constant(zoom=2.0), 3, (16, 16))
    assert torch.allclose(zoom[:, 0, :, :8], -zoom[:, 0, :, 8:].flip(-1), atol=1e-5)  # outward from the centre
    assert float(zoom[0, 0, 8, -1]) > 0 > float(zoom[0, 0, 8, 0])

    assert metrics.camera_flow_error(flow, pan) == pytest.approx(0.0, abs=1e-5)
    assert metrics.camera_flow_error(flow, CameraPath.constant(x=-0.25)) == pytest.approx(4.0)
    # Pixels of the subject are left out: a subject moving its own way does not count.
    moved = flow.clone()
    moved[:, :, :4, :4] = 5.0
    subject = torch.zeros(4, 16, 32, dtype=torch.bool)
    subject[:, :4, :4] = True
    assert metrics.camera_flow_error(moved, pan, subject) == pytest.approx(0.0, abs=1e-5)
    assert metrics.camera_flow_error(moved, pan) > 0.1


def test_box_flow_error_of_a_subject_on_its_path_and_off_it():
    clip, masks = moving_square_clip(frames=5, size=(40, 56), step=(3, 1), side=10)
    flow = torch.zeros(4, 2, 40, 56)
    flow[:, 0], flow[:, 1] = masks[:-1] * 3, masks[:-1] * 1
    # Boxes a little larger than the square (the still background inside them does not count).
    boxes = mask_boxes(masks) + torch.tensor([-0.05, -0.05, 0.05, 0.05])
    assert metrics.box_flow_error(flow, boxes) == pytest.approx(0.0, abs=1e-5)
    backwards = boxes.flip(0)
    assert metrics.box_flow_error(flow, backwards) == pytest.approx(2 * math.hypot(3, 1), abs=1e-4)
