"""Running a shapes-world workflow again repeats its documented run: the same video, every node run again."""


import pytest
import torch
from workflow_api import shipped, to_api

from custvid_core.media import read_video


@pytest.mark.parametrize("name", ["02", "04", "05", "01"])  # generate, camera, box steering, customize
def test_world_workflow_gives_the_same_video_twice(comfy_server, name):
    workflow = shipped(name)
    prompt = to_api(workflow, comfy_server.object_info())
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            node["inputs"]["steps"] = 6  # fewer sampling steps, the same graph
        if node["class_type"] in ("CustVid_TrainSubjectLoRA", "CustVid_TrainMotionLoRA"):
            # A short training; the second run finds it finished in its checkpoint.
            node["inputs"].update(steps=3, run_name=node["inputs"]["run_name"] + "_rerun_test")
    save = next(i for i, node in prompt.items() if node["class_type"] == "SaveVideo")
    videos = []
    for _ in range(2):
        comfy_server.clear_cache()
        result = comfy_server.run(prompt, timeout=900)
        assert result["ok"], result["error"]
        assert result["cached"] == []
        saved = result["outputs"][save]["images"][0]
        videos.append(read_video(comfy_server.base / "output" / saved["subfolder"] / saved["filename"]))
    assert torch.equal(videos[0], videos[1])
