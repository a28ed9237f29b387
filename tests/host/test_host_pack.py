"""The pack inside a real ComfyUI: it loads, its nodes are listed properly, its workflows connect."""

import json

from comfy_host import REPO, custvid_import_seconds
from workflow_api import check_links, ordered_inputs

NODE_IDS = {
    "CustVid_LoadDINOv2", "CustVid_LoadRAFT", "CustVid_SubjectRepresentation", "CustVid_MotionRepresentation",
    "CustVid_FlowPreview", "CustVid_SaveRepresentation", "CustVid_LoadSubjectRepresentation",
    "CustVid_LoadMotionRepresentation", "CustVid_LoadShapesWorld", "CustVid_WorldTextEncode",
    "CustVid_WorldEmptyLatent", "CustVid_WorldCaseData", "CustVid_VideoDataset", "CustVid_SubjectDataset",
    "CustVid_TrainSubjectLoRA", "CustVid_TrainMotionLoRA", "CustVid_SaveLoRA", "CustVid_ApplyLoRASchedule",
    "CustVid_ApplyTriggerEmbedding", "CustVid_SaveTriggerEmbedding", "CustVid_LoadTriggerEmbedding",
    "CustVid_LoadShapesWorldClip", "CustVid_WorldPreservationClipsV2", "CustVid_CameraShiftSamplerV2",
    "CustVid_CameraSampleV2", "CustVid_TrainJointLoRAs", "CustVid_SubjectPriorClips", "CustVid_ApplySynMotionEmbeddings",
    "CustVid_SaveSynMotionEmbeddings", "CustVid_LoadSynMotionEmbeddings", "CustVid_TrainSynMotion",
    "CustVid_LoadCLIPForMetrics", "CustVid_MeasureVideo", "CustVid_CompareRuns",
    "CustVid_SaveDatasetCache", "CustVid_LoadVideoDatasetCache", "CustVid_LoadSubjectDatasetCache",
    "CustVid_EstimateTrainingMemory",
}
# Kept for saved workflows, hidden from the node search.
DEPRECATED = {"CustVid_LoadShapesWorld", "CustVid_WorldTextEncode", "CustVid_WorldPreservationClips",
              "CustVid_CameraShiftSampler", "CustVid_CameraSample"}


def custvid_nodes(object_info):
    return {k: v for k, v in object_info.items() if "CustVid" in v.get("python_module", "")}


def test_pack_imports_without_error_and_quickly(comfy_server):
    log = comfy_server.log.read_text()
    seconds = custvid_import_seconds(log)
    assert seconds is not None, log[-3000:]
    custvid_lines = [line for line in log.splitlines() if "custom_nodes/CustVid" in line]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in custvid_lines), custvid_lines
    assert seconds < 0.5, f"loading CustVid took {seconds}s"


def test_every_node_is_listed_with_category_tooltips_and_custvid_types(comfy_server):
    info = custvid_nodes(comfy_server.object_info())
    assert NODE_IDS | DEPRECATED <= set(info)
    assert {k for k, v in info.items() if v.get("deprecated")} == DEPRECATED
    for node_id in set(info) - DEPRECATED:  # the shapes world's needs are no choices on the nodes in use
        assert not {"latent_layout", "world_text"} & set(dict(ordered_inputs(info[node_id]))), node_id
        assert "CUSTVID_WORLD_TEXT" not in info[node_id]["output"], node_id
    for node_id, node in info.items():
        assert node["category"].startswith("CustVid/"), node_id
        assert node["description"], node_id
        for name, spec in ordered_inputs(node):
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        for out_type in node["output"]:
            assert not out_type.startswith("CUSTVID") or out_type.startswith("CUSTVID_"), node_id


def test_model_folders_are_registered_and_listed(comfy_server):
    info = comfy_server.object_info()
    dino_files = info["CustVid_LoadDINOv2"]["input"]["required"]["dino_name"]
    raft_files = info["CustVid_LoadRAFT"]["input"]["required"]["raft_name"]
    options = lambda spec: spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # noqa: E731
    assert "dinov2-base/model.safetensors" in options(dino_files)
    assert "raft_large_C_T_SKHT_V2-ff5fadd5.pth" in options(raft_files)


def test_every_shipped_workflow_connects(comfy_server):
    info = comfy_server.object_info()
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        problems = check_links(json.loads(path.read_text()), info)
        assert not problems, f"{path.name}: {problems}"


def test_every_seed_input_says_whether_the_frontend_adds_a_control(comfy_server):
    """The frontend gives an INT input named seed or noise_seed a control set to 'randomize' unless its schema says
    otherwise: a seed that picks data (clips to generate once and cache) must say False, or every run picks others."""
    for node_id, node in custvid_nodes(comfy_server.object_info()).items():
        for name, spec in ordered_inputs(node):
            if name in ("seed", "noise_seed") and spec[0] == "INT":
                assert "control_after_generate" in spec[1], f"{node_id}.{name}"
