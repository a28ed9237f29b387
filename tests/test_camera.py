"""Latent-shift camera control: moves, fill and boxes against hand-computed answers."""

import pytest
import torch

from custvid_core.control.camera import CameraPath, LatentShift, StepWindow, move_boxes
from custvid_core.control.sampling import SamplingStep
from custvid_core.errors import InputError


def _step(index, steps):
    return SamplingStep.of(index, torch.linspace(1, 0, steps + 1))


ONLY_STEP = _step(0, 1)  # the one step of a one-step schedule


def _latent(frames=3, h=8, w=16, channels=2):
    # Every cell of every channel holds a distinct value, so each output cell names its source.
    return torch.arange(channels * frames * h * w, dtype=torch.float32).view(1, channels, frames, h, w)


def _run(shift, x, steps):
    for i in range(steps):
        x = shift.after_step(_step(i, steps), x)
    return x


def test_a_steady_pan_moves_later_frames_in_proportion_and_keeps_frame_zero():
    x = _latent()
    shift = LatentShift(CameraPath.constant(0.25, 0.0), steps=4, frames=3, window=StepWindow(0.0, 1.0))
    out = _run(shift, x, 4)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    # Camera right by a quarter of 16 columns: content moves 4 columns left on the last frame, 2 on the middle.
    assert torch.equal(out[:, :, 2, :, :12], x[:, :, 2, :, 4:])
    assert torch.equal(out[:, :, 1, :, :14], x[:, :, 1, :, 2:])
    # The vacated strip holds values of the same row and frame, all channels moved together.
    strip = out[0, :, 2, :, 12:]
    for r in range(8):
        assert set(strip[0, r].tolist()) <= set(x[0, 0, 2, r].tolist())
    assert torch.equal(strip[1] - strip[0], torch.full_like(strip[0], 3 * 8 * 16))
    # In one step, a strip of 4 takes 4 different cells of the row's 12 remaining ones.
    one = LatentShift(CameraPath.constant(0.25, 0.0), steps=1, frames=3, window=StepWindow(0.0, 1.0)).after_step(ONLY_STEP, x)
    for r in range(8):
        values = one[0, 0, 2, r, 12:].tolist()
        assert len(set(values)) == 4 and set(values) <= set(x[0, 0, 2, r, 4:].tolist())


def test_fractional_pans_accumulate_over_the_window():
    x = _latent(frames=2)
    # 3 columns over 4 shift steps: 0.75 per step, rounded positions must add up to exactly 3.
    shift = LatentShift(CameraPath.constant(3 / 16, 0.0), steps=10, frames=2, window=StepWindow(0.2, 0.6))
    assert list(shift.window) == [2, 3, 4, 5]
    out = _run(shift, x, 10)
    assert torch.equal(out[:, :, 1, :, :13], x[:, :, 1, :, 3:])


def test_a_vertical_pan_fills_whole_rows_from_their_columns():
    x = _latent(frames=2)
    shift = LatentShift(CameraPath.constant(0.0, -0.25), steps=1, frames=2, window=StepWindow(0.0, 1.0))
    out = shift.after_step(ONLY_STEP, x)
    assert torch.equal(out[:, :, 1, 2:], x[:, :, 1, :6])  # camera up: content moves 2 rows down
    for c in range(16):
        assert set(out[0, 0, 1, :2, c].tolist()) <= set(x[0, 0, 1, :6, c].tolist())


def test_the_fill_never_copies_the_subject_and_boxes_move_with_the_content():
    x = _latent(frames=2, h=4, w=16)
    boxes = torch.tensor([[[0.5, 0.0, 1.0, 1.0]], [[0.5, 0.0, 1.0, 1.0]]])
    given = boxes.clone()
    shift = LatentShift(CameraPath.constant(0.25, 0.0), steps=1, frames=2, window=StepWindow(0.0, 1.0), boxes=boxes)
    out = shift.after_step(ONLY_STEP, x)
    assert torch.equal(boxes, given)  # the caller's boxes are not touched
    assert torch.allclose(shift.boxes[1], torch.tensor([[0.25, 0.0, 0.75, 1.0]]))
    assert torch.allclose(shift.boxes[0], given[0])
    # After the move the subject covers columns 4..11; the fill may only use columns 0..3 of the frame.
    allowed = set(x[0, 0, 1, :, 4:8].flatten().tolist())
    assert set(out[0, 0, 1, :, 12:].flatten().tolist()) <= allowed


def test_more_vacated_cells_than_free_ones_reuses_free_cells_instead_of_failing():
    x = _latent(frames=2, h=2, w=8)
    boxes = torch.tensor([[[0.0, 0.0, 0.6, 1.0]]] * 2)
    shift = LatentShift(CameraPath.constant(0.5, 0.0), steps=1, frames=2, window=StepWindow(0.0, 1.0), boxes=boxes)
    out = shift.after_step(ONLY_STEP, x)
    assert torch.isfinite(out).all()


def test_zoom_is_about_the_centre_and_the_fill_is_deterministic_by_seed():
    x = _latent(frames=2, h=8, w=8)
    zoom = LatentShift(CameraPath.constant(zoom=2.0), steps=1, frames=2, window=StepWindow(0.0, 1.0))
    out = zoom.after_step(ONLY_STEP, x)
    # Zooming in by 2 shows the central half: new cell i comes from cell round((i + 0.5) / 2 + 1.5).
    src = torch.tensor([2, 2, 3, 3, 4, 4, 5, 5])
    assert torch.equal(out[0, 0, 1], x[0, 0, 1][src][:, src])
    out_a = LatentShift(CameraPath.constant(zoom=0.5), 1, 2, StepWindow(0.0, 1.0), seed=1).after_step(ONLY_STEP, x)
    out_b = LatentShift(CameraPath.constant(zoom=0.5), 1, 2, StepWindow(0.0, 1.0), seed=1).after_step(ONLY_STEP, x)
    out_c = LatentShift(CameraPath.constant(zoom=0.5), 1, 2, StepWindow(0.0, 1.0), seed=2).after_step(ONLY_STEP, x)
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)
    # Zooming out by 2 shows every other cell in the centre; the border is filled.
    assert torch.equal(out_a[0, 0, 1, 2:6, 2:6], x[0, 0, 1, 1::2, 1::2])


def test_keyframed_paths_interpolate_and_boxes_follow():
    path = CameraPath.parse("0.5: 0.2, 0\n1: 0.2, 0.1, 1.5")
    assert path.keys[0].at == 0.0
    per_frame = path.per_frame(5)
    assert torch.allclose(per_frame[:, 0], torch.tensor([0.0, 0.1, 0.2, 0.2, 0.2]))
    assert torch.allclose(per_frame[:, 1], torch.tensor([0.0, 0.0, 0.0, 0.05, 0.1]))
    assert per_frame[4, 2] == pytest.approx(1.5)
    assert CameraPath.parse('[{"at": 1, "x": 0.3}]').per_frame(2)[1, 0] == pytest.approx(0.3)
    moved = move_boxes(torch.tensor([[[0.4, 0.4, 0.6, 0.6]]]), torch.tensor([[0.1, 0.0, 2.0]]), 1.0)
    assert torch.allclose(moved, torch.tensor([[[0.2, 0.3, 0.6, 0.7]]]))


def test_a_keyframed_pan_then_zoom_moves_each_frame_by_its_own_keyframe():
    x = _latent(frames=3, h=8, w=8)
    # Pan right by a quarter by mid-clip, then zoom in 2x at the same pan by the end.
    path = CameraPath.parse("0.5: 0.25, 0\n1: 0.25, 0, 2")
    out = LatentShift(path, steps=1, frames=3, window=StepWindow(0.0, 1.0)).after_step(ONLY_STEP, x)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.equal(out[:, :, 1, :, :6], x[:, :, 1, :, 2:])
    # Last frame: the central half, centred 2 columns to the right: rows from round(r / 2 + 1.75),
    # columns from round((c + 2 - 3.5) / 2 + 3.5).
    rows, cols = torch.tensor([2, 2, 3, 3, 4, 4, 5, 5]), torch.tensor([3, 3, 4, 4, 5, 5, 6, 6])
    assert torch.equal(out[0, :, 2], x[0, :, 2][:, rows][:, :, cols])
    # Over a window of two steps the mid-clip pan lands on the same columns.
    out = _run(LatentShift(path, steps=2, frames=3, window=StepWindow(0.0, 1.0)), x, 2)
    assert torch.equal(out[:, :, 1, :, :6], x[:, :, 1, :, 2:])


@pytest.mark.parametrize("make, name", [
    (lambda: CameraPath.constant(1.5, 0.0), "camera"),
    (lambda: CameraPath.constant(zoom=10.0), "camera"),
    (lambda: CameraPath.parse("half: 1, 2"), "camera_path"),
    (lambda: CameraPath.parse("1: 2, 0"), "camera_path"),
    (lambda: StepWindow(0.5, 0.3), "window"),
    (lambda: StepWindow(0.2, 1.2), "window"),
    (lambda: LatentShift(CameraPath.constant(0.1), 10, 3, boxes=torch.zeros(2, 1, 4)), "boxes"),
])
def test_bad_camera_input_names_the_input(make, name):
    with pytest.raises(InputError) as e:
        make()
    assert e.value.input_name == name


def test_wan22_latents_with_48_channels_shift_every_channel_together():
    x = _latent(frames=3, h=4, w=16, channels=48)
    out = LatentShift(CameraPath.constant(0.25, 0.0), 1, 3, StepWindow(0.0, 1.0)).after_step(ONLY_STEP, x)
    assert out.shape == x.shape and torch.equal(out[:, :, 2, :, :12], x[:, :, 2, :, 4:])
    strip = out[0, :, 2, :, 12:]
    assert torch.equal(strip - strip[:1], (torch.arange(48) * 3 * 4 * 16).view(48, 1, 1).float().expand_as(strip))


def test_a_step_of_another_schedule_is_refused():
    shift = LatentShift(CameraPath.constant(0.25, 0.0), steps=4, frames=3, window=StepWindow(0.0, 1.0))
    with pytest.raises(InputError, match="steps: a schedule of 5 steps"):
        shift.after_step(_step(0, 5), _latent())
