"""All the metrics of a clip in one pass: known answers with tiny random CLIP / DINOv2 (a clip of the reference photo
itself) and with the shapes world's trained RAFT (a known camera pan, a known subject path, a clip against itself)."""

import math

import pytest
import torch
from builders import TINY_DINO, moving_square_clip, tiny_clip_folder

from custvid_core.control.boxes import BoxTrack
from custvid_core.control.camera import CameraPath
from custvid_core.errors import InputError
from custvid_core.eval import measure, report
from custvid_core.eval.clip import load_clip
from custvid_core.representations.motion import compute_flow, load_raft
from custvid_core.representations.subject import build_dinov2
from custvid_core.world.encoders import RAFT_FILE
from custvid_core.world.scene import Scene, WorldSpec, render


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="module")
def world_raft():
    return load_raft(RAFT_FILE)


def _quiet(*_):
    pass


def test_a_still_clip_of_the_reference_photo_matches_it_fully(clip):
    torch.manual_seed(0)
    dino = build_dinov2(TINY_DINO)
    photo, masks = moving_square_clip(frames=1, size=(40, 56), side=16)
    frames = photo.repeat(4, 1, 1, 1)
    targets = measure.Targets(prompt="a white square", photos=photo, photo_masks=masks, masks=masks.repeat(4, 1, 1))
    done = []
    scores = measure.measure_video(frames, targets, measure.Encoders(clip=clip, dino=dino),
                                   progress=lambda d, total: done.append((d, total)))
    for name in ("clip_i", "dino_i", "r_clip", "r_dino", "t_cons"):
        assert scores[name] == pytest.approx(1.0, abs=1e-5), name
    assert -1.0 <= scores["clip_t"] <= 1.0
    assert all(math.isnan(scores[k]) for k in ("flicker", "dynamic_degree", "motion_fidelity", "camera_flow_error"))
    assert done[-1][0] == done[-1][1]  # the bar ends full

    # Something else: every appearance score falls.
    other = torch.rand(frames.shape, generator=torch.Generator().manual_seed(1))
    lower = measure.measure_video(other, targets, measure.Encoders(clip=clip, dino=dino), progress=_quiet)
    for name in ("clip_i", "dino_i", "r_clip", "r_dino"):
        assert lower[name] < scores[name] - 1e-3, name


def test_a_moving_subject_under_a_still_camera_measured_with_the_world_raft(world_raft):
    # The world's RAFT follows its objects but not its faint background (it sees pans as still), so the camera's
    # known answer here is the still camera; flow_error's pan arithmetic is tested on exact flows.
    spec = WorldSpec()
    moving = render(Scene(direction="right", speed=3.0, start=(8.0, 16.0)), spec)
    still = render(Scene(speed=0.0, start=(16.0, 16.0)), spec).frames
    encoders = measure.Encoders(raft=world_raft)
    camera_still, camera_panning = CameraPath.constant(), CameraPath.constant(x=0.25)
    own = measure.measure_video(moving.frames, measure.Targets(camera=camera_still, clips=[moving.frames],
                                                               masks=moving.masks), encoders, progress=_quiet)
    assert own["camera_flow_error"] < 0.3
    assert own["motion_fidelity"] == pytest.approx(1.0)
    assert own["dynamic_degree_deviation"] == pytest.approx(0.0, abs=1e-5)
    assert own["motion_smoothness"] > 0.9
    panning = measure.measure_video(moving.frames, measure.Targets(camera=camera_panning, masks=moving.masks),
                                    encoders, progress=_quiet)
    assert panning["camera_flow_error"] > 1.5
    # The reference clips' flow, when already computed, stands for the clips.
    flows = [compute_flow(world_raft, moving.frames, progress=_quiet)]
    given = measure.measure_video(moving.frames, measure.Targets(clip_flows=flows), encoders, progress=_quiet)
    assert given["motion_fidelity"] == own["motion_fidelity"]
    assert given["dynamic_degree_deviation"] == own["dynamic_degree_deviation"]

    steady = measure.measure_video(still, measure.Targets(clips=[moving.frames]), encoders, progress=_quiet)
    assert steady["flicker"] < 0.01
    assert steady["dynamic_degree"] < own["dynamic_degree"] / 4
    assert steady["dynamic_degree_deviation"] > 0.75 * own["dynamic_degree"]
    assert steady["motion_fidelity"] < 0.5


def test_a_subject_on_its_box_path_and_off_it(world_raft):
    clip = render(Scene(direction="right", speed=3.0, start=(8.0, 16.0)), WorldSpec())
    boxes = BoxTrack.from_masks(clip.masks)
    encoders = measure.Encoders(raft=world_raft)
    on_path = measure.measure_video(clip.frames, measure.Targets(boxes=boxes), encoders, progress=_quiet)
    backwards = BoxTrack(tuple((1 - at, box) for at, box in reversed(boxes.keys)))
    off_path = measure.measure_video(clip.frames, measure.Targets(boxes=backwards), encoders, progress=_quiet)
    assert on_path["box_flow_error"] < 1.0
    assert off_path["box_flow_error"] > 4.0


def test_bad_inputs_are_refused_with_the_input_named(clip):
    frames, masks = moving_square_clip(frames=3)
    encoders = measure.Encoders(clip=clip)
    with pytest.raises(InputError, match="frames: only 1 given"):
        measure.measure_video(frames[:1], measure.Targets(), encoders, progress=_quiet)
    with pytest.raises(InputError, match="reference_masks: 2 masks were given for 1 images"):
        measure.measure_video(frames, measure.Targets(photos=frames[:1], photo_masks=masks[:2]), encoders, progress=_quiet)
    with pytest.raises(InputError, match="reference_masks: a mask is empty"):
        measure.measure_video(frames, measure.Targets(photos=frames[:1], photo_masks=masks[:1] * 0), encoders,
                              progress=_quiet)
    with pytest.raises(InputError, match="subject_masks: every mask is empty"):
        measure.measure_video(frames, measure.Targets(masks=masks * 0), encoders, progress=_quiet)
    with pytest.raises(InputError, match="reference_clip: frames have different sizes"):
        measure.measure_video(frames, measure.Targets(clips=[[frames[0], frames[1, :20]]]), encoders, progress=_quiet)
    with pytest.raises(InputError, match="clip_name: '.*' has no config.json"):
        load_clip(RAFT_FILE.parent)


def test_reports_list_what_was_measured():
    a = dict.fromkeys(measure.METRICS, math.nan) | {"clip_t": 0.25, "dynamic_degree": 4.0}
    b = dict.fromkeys(measure.METRICS, math.nan) | {"clip_t": 0.5, "dynamic_degree": 2.0}
    text = report.scores_text(a)
    assert text.splitlines()[0].startswith("clip_t: 0.2500") and len(text.splitlines()) == 2
    table = report.markdown_table([{"video": "a", **a}, {"video": "b", **b}], "note")
    assert "| video | clip_t | dynamic_degree |" in table and "| **average** | 0.375 | 3.000 |" in table
    assert "| clip_t | 0.2500 | 0.5000 | +0.2500 | higher |" in report.comparison_text(a, b, ("a", "b"))
    chart = report.score_chart([a, b], ["a", "b"])
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and float(chart.min()) < 0.5


def test_side_by_side_matches_heights_and_frame_counts():
    from custvid_core.media import side_by_side

    left, right = torch.rand(3, 20, 30, 3), torch.full((4, 10, 12, 3), 0.25)
    pair = side_by_side(left, right)
    assert pair.shape == (3, 20, 30 + 2 + 24, 3)  # the right clip doubled to the left's height, cut to 3 frames
    assert torch.equal(pair[:, :, :30], left) and float(pair[:, :, 30:32].min()) == 1.0
    assert torch.allclose(pair[:, :, 32:], torch.full((3, 20, 24, 3), 0.25))
