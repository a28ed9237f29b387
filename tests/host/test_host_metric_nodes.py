"""The metric nodes in ComfyUI (in-process from COMFYUI_PATH), on a tiny random CLIP and the shapes world's DINOv2 and
RAFT as Load DINOv2 / Load RAFT offer them: Measure Video gives the library's scores as text and a chart, Compare Runs
both runs side by side, and bad input is refused with the input named."""

import pytest
import torch
from builders import tiny_clip_folder
from comfy_host import import_comfy, import_pack

from custvid_core.control.boxes import BoxTrack
from custvid_core.eval import measure
from custvid_core.files import save_safetensors
from custvid_core.world.scene import Scene, render

DINO = "custvid_shapes_world_dinov2.safetensors"
RAFT = "custvid_shapes_world_raft_small.safetensors"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    import_comfy()
    import folder_paths

    import_pack()
    from custvid_pack.nodes import metric_nodes, representation_nodes

    folder = tmp_path_factory.mktemp("clip_models")
    tiny_clip_folder(folder / "tiny-clip")
    save_safetensors(folder / "loose.safetensors", {"weight": torch.zeros(2)})  # weights without their folder
    folder_paths.add_model_folder_path("custvid_clip", str(folder), is_default=True)
    with torch.inference_mode():  # as ComfyUI runs nodes
        clip = metric_nodes.LoadCLIPForMetrics.execute("tiny-clip/model.safetensors").result[0]
        dino = representation_nodes.LoadDINOv2.execute(DINO, "fp32").result[0]
        raft = representation_nodes.LoadRAFT.execute(RAFT).result[0]
    right = render(Scene(colour="red", direction="right", speed=3.0, start=(8.0, 16.0)))
    left = render(Scene(colour="blue", shape="square", direction="left", speed=3.0, start=(24.0, 16.0)))
    return metric_nodes, {"clip": clip, "dino": dino, "raft": raft}, right, left


def test_measure_video_gives_the_library_scores_as_text_and_a_chart(host):
    nodes, encoders, right, _ = host
    boxes = BoxTrack.from_masks(right.masks)
    inputs = dict(prompt="a red circle moving right", reference_photos=right.frames[2:3],
                  reference_masks=right.masks[2:3], reference_clip=right.frames, boxes=boxes, camera_path="1: 0, 0")
    frames = right.frames.clone()
    with torch.inference_mode():
        out = nodes.MeasureVideo.execute(right.frames, **encoders, **inputs)
    text, chart = out.result
    assert torch.equal(right.frames, frames)  # the input frames are not changed
    expected = measure.measure_video(
        right.frames, measure.Targets(prompt=inputs["prompt"], photos=right.frames[2:3], photo_masks=right.masks[2:3],
                                      clips=[right.frames], boxes=boxes, camera=measure.CameraPath.constant()),
        measure.Encoders(clip=encoders["clip"].core, dino=encoders["dino"].core, raft=encoders["raft"].core),
        progress=lambda *_: None)
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert list(lines) == list(measure.METRICS)  # every metric measured, in order
    for name, value in expected.items():
        assert float(lines[name].split()[0]) == pytest.approx(value, abs=1e-4), name
    assert float(lines["motion_fidelity"].split()[0]) == pytest.approx(1.0)
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    assert out.ui.as_dict() == {"text": (text,)}  # shown under the node

    # With RAFT alone only the motion is measured.
    with torch.inference_mode():
        motion_only = nodes.MeasureVideo.execute(right.frames, raft=encoders["raft"]).result[0]
    assert [line.split(":")[0] for line in motion_only.splitlines()] == ["flicker", "motion_smoothness", "dynamic_degree"]


def test_compare_runs_puts_two_videos_side_by_side(host):
    nodes, encoders, right, left = host
    with torch.inference_mode():
        out = nodes.CompareRuns.execute(left.frames, right.frames, "left", "right", **encoders,
                                        reference_photos=right.frames[2:3], reference_clip=right.frames)
    text, chart, pair = out.result
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert text.splitlines()[0] == "| metric | left | right | right - left | better |"
    assert float(rows["motion_fidelity"][2]) == pytest.approx(1.0) and float(rows["motion_fidelity"][1]) < 0.5
    assert float(rows["dino_i"][2]) > float(rows["dino_i"][1])
    assert pair.shape == (5, 32, 66, 3)  # both clips with a 2-pixel gap
    assert torch.equal(pair[:, :, :32], left.frames) and torch.equal(pair[:, :, 34:], right.frames)
    assert chart.shape[0] == 1


def test_bad_input_is_refused_with_the_input_named(host):
    nodes, encoders, right, _ = host
    with torch.inference_mode():
        with pytest.raises(ValueError, match="camera_path: could not read 'sideways'"):
            nodes.MeasureVideo.execute(right.frames, raft=encoders["raft"], camera_path="sideways")
        with pytest.raises(ValueError, match="frames: only 1 given"):
            nodes.MeasureVideo.execute(right.frames[:1], raft=encoders["raft"])
        with pytest.raises(ValueError, match="frames_b: only 1 given"):
            nodes.CompareRuns.execute(right.frames, right.frames[:1], "a", "b", raft=encoders["raft"])
        with pytest.raises(ValueError, match="subject_masks: 3 masks were given for 5 images"):
            nodes.MeasureVideo.execute(right.frames, raft=encoders["raft"], subject_masks=right.masks[:3])
        with pytest.raises(ValueError, match="reference_masks: they were given without reference photos"):
            nodes.MeasureVideo.execute(right.frames, dino=encoders["dino"], reference_masks=right.masks[:1])
        with pytest.raises(ValueError, match="reference_masks: 2 masks were given for 1 images"):
            nodes.MeasureVideo.execute(right.frames, dino=encoders["dino"], reference_photos=right.frames[:1],
                                       reference_masks=right.masks[:2])
        with pytest.raises(ValueError, match="clip_name: '.*' has no config.json"):
            nodes.LoadCLIPForMetrics.execute("loose.safetensors")
