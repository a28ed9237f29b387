"""`python -m custvid_core metrics`: video files and frame folders measured against reference photos and clips, written
as JSON, CSV and the benchmark's markdown table."""

import csv
import json

import pytest
import torch
from builders import tiny_clip_folder

from custvid_core.cli import main
from custvid_core.control.boxes import BoxTrack
from custvid_core.media import save_gif, save_png
from custvid_core.world.encoders import DINO_FILE, RAFT_FILE
from custvid_core.world.scene import Scene, render


def _frames_folder(folder, frames):
    folder.mkdir()
    for i, frame in enumerate(frames):
        save_png(frame, folder / f"{i:03d}.png")
    return folder


def _cut_out(path, frame, mask):
    """A PNG whose alpha is the mask (a cut-out photo)."""
    from PIL import Image

    from custvid_core.media import to_uint8

    rgba = torch.cat([frame, mask[..., None]], -1)
    Image.fromarray(to_uint8(rgba[None])[0], mode="RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_cli")
    right = render(Scene(colour="red", direction="right", speed=3.0, start=(8.0, 16.0)))
    left = render(Scene(colour="blue", shape="square", direction="left", speed=3.0, start=(24.0, 16.0)))
    return {
        "right": _frames_folder(root / "right", right.frames),
        "left": save_gif(left.frames, root / "left.gif"),
        "reference_clip": _frames_folder(root / "reference_clip", right.frames),
        "photo": _cut_out(root / "photo.png", right.frames[2], right.masks[2]),
        "clip": tiny_clip_folder(root / "clip"),
        "boxes": BoxTrack.from_masks(right.masks).to_json(),
    }


def test_metrics_of_two_videos_against_a_photo_and_a_clip(files, tmp_path):
    out = tmp_path / "out"
    code = main(["metrics", "--videos", str(files["right"]), str(files["left"]), "--out", str(out),
                 "--prompts", "a red circle moving right", "a blue square moving left",
                 "--references", str(files["photo"]), "--reference-clips", str(files["reference_clip"]),
                 "--boxes", files["boxes"],
                 "--clip", str(files["clip"]), "--dino", str(DINO_FILE), "--raft", str(RAFT_FILE)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    right, left = results["rows"]
    assert (right["video"], left["video"]) == ("right", "left.gif")
    assert right["prompt"] == "a red circle moving right"
    # The video that is the reference clip moves as it does and shows the photo's subject; the other does not.
    assert right["motion_fidelity"] == pytest.approx(1.0)
    assert right["dynamic_degree_deviation"] == pytest.approx(0.0, abs=1e-5)
    assert left["motion_fidelity"] < 0.5
    assert right["dino_i"] > left["dino_i"] + 0.1
    # The photo's transparency is its subject's region; the boxes (the first video's path) the videos'.
    assert right["r_dino"] > left["r_dino"] + 0.1
    assert right["box_flow_error"] < 1.0 < left["box_flow_error"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == ["right", "left.gif"]
    assert float(rows[0]["dino_i"]) == pytest.approx(right["dino_i"])
    table = (out / "results.md").read_text()
    assert "| video | clip_t | clip_i | dino_i | r_clip | r_dino | t_cons | flicker |" in table
    assert "| **average** |" in table and "| right |" in table


@pytest.mark.parametrize("options, named", [
    (["--prompts", "a", "b", "c"], "--prompts"),
    (["--references", "nowhere.png"], "--references"),
    (["--camera-path", "sideways"], "camera_path"),
    (["--batch-size", "0"], "batch-size"),
])
def test_bad_options_are_refused_with_the_option_named(files, tmp_path, capsys, options, named):
    with pytest.raises(SystemExit) as exit_:
        main(["metrics", "--videos", str(files["right"]), str(files["left"]), "--out", str(tmp_path / "out"),
              "--raft", str(RAFT_FILE), *options])
    assert exit_.value.code == 2 and f"error: {named}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
