"""The world's RAFT and DINOv2: exact training targets, and the shipped weights' quality."""

import pytest
import torch

from custvid_core.representations.motion import load_raft
from custvid_core.representations.subject import load_dinov2
from custvid_core.world.encoders import DINO_FILE, RAFT_FILE, dino_quality, exact_flow, raft_quality
from custvid_core.world.scene import Scene, render


def test_exact_flow_moves_the_object_with_its_path_and_the_background_against_the_camera():
    clip = render(Scene(direction="right", speed=2.0, start=(10, 16), camera=(1.0, -0.5), object_size=10))
    flow = exact_flow(clip)
    assert flow.shape == (len(clip.frames) - 1, 2, 32, 32)
    obj = clip.masks[:-1] > 0.5
    assert torch.all(flow[:, 0][obj] == 2.0) and torch.all(flow[:, 1][obj] == 0.0)
    assert torch.all(flow[:, 0][~obj] == -1.0) and torch.all(flow[:, 1][~obj] == 0.5)
    # Warping frame t's background by the flow reproduces frame t+1 there (the content moved against the camera).
    still = render(Scene(direction="right", speed=0.0, start=(10, 16), camera=(1.0, 0.0), object_size=10))
    assert torch.allclose(still.frames[1, 24:, 2:30], still.frames[0, 24:, 3:31], atol=1e-5)


@pytest.mark.skipif(not RAFT_FILE.exists(), reason="world RAFT not trained yet")
def test_shipped_world_raft_recovers_world_flow():
    raft = load_raft(RAFT_FILE)
    assert raft.variant == "raft_small"
    quality = raft_quality(raft, clips=4, seed=7)
    # Far better than no flow at all, on the whole frame and on the moving object.
    assert quality["epe_px"] < 0.7 * quality["zero_flow_epe_px"]
    assert quality["epe_object_px"] < 0.4 * quality["zero_flow_epe_object_px"]


@pytest.mark.skipif(not DINO_FILE.exists(), reason="world DINOv2 not trained yet")
def test_shipped_world_dino_separates_subjects():
    quality = dino_quality(load_dinov2(DINO_FILE), per_class=60, seed=7)
    # Colour (9 classes) and texture (4) are mostly right, shape (8 classes, chance 1/8) far less often, but
    # well above chance: see docs/results.md.
    assert quality["colour_accuracy"] > 0.8 and quality["shape_accuracy"] > 2.5 / 8
    assert quality["texture_accuracy"] > 0.8
    assert quality["same_subject_cosine"] > quality["different_subject_cosine"] + 0.2
