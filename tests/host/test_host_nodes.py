"""Every CustVid node executed by a real ComfyUI server, its results checked against the library."""

import pytest
import torch
from comfy_host import MOTION_CLIP, RAFT_FILE, REPO, SUBJECT_PHOTO, TINY_DINO, example_clip
from PIL import Image
from workflow_api import shipped, to_api

from custvid_core.media import read_video
from custvid_core.representations.motion import extract_motion, load_raft
from custvid_core.representations.storage import load_representation
from custvid_core.representations.subject import extract_subject, load_dinov2
from custvid_core.world.cases import load_cases

WORLD_WEIGHTS = REPO / "custvid_core" / "world" / "weights"

quiet = dict(progress=lambda done, total: None)


def reps_dir(server):
    return server.base / "models" / "custvid" / "representations"


@pytest.fixture(scope="module")
def extracted(comfy_server):
    """Run the shipped extraction workflow once, as a user would after loading it."""
    workflow = shipped("03")
    result = comfy_server.run(to_api(workflow, comfy_server.object_info()))
    assert result["ok"], result["error"]
    return result


def test_extraction_workflow_runs_as_shipped_on_the_worlds_encoders_and_data(comfy_server, extracted):
    """No download and no file of the user's: the world's example case, DINOv2 and RAFT, as the library
    computes them."""
    subject_file = load_representation(reps_dir(comfy_server) / "my_subject.safetensors", "subject")
    motion_file = load_representation(reps_dir(comfy_server) / "my_motion.safetensors", "motion")

    case = next(c for c in load_cases() if c.name == "orange_star_circle")
    photos = case.subject_images()
    dino = load_dinov2(WORLD_WEIGHTS / "dino" / "custvid_shapes_world_dinov2.safetensors")
    expected = extract_subject(dino, torch.cat([p.frames for p in photos]), torch.cat([p.masks for p in photos]),
                               resolution=32, fit="stretch", **quiet)
    assert subject_file.has_masks and subject_file.patch_tokens.shape[0] == len(photos)
    assert torch.allclose(subject_file.patch_tokens, expected.patch_tokens, atol=1e-3)
    assert torch.allclose(subject_file.object_features, expected.object_features, atol=1e-3)

    frames = case.motion_clips()[0].frames
    raft = load_raft(WORLD_WEIGHTS / "raft" / "custvid_shapes_world_raft_small.safetensors")
    expected = extract_motion(raft, frames, iterations=12, max_side=512, **quiet)
    assert motion_file.flow.shape == (len(frames) - 1, 2, *frames.shape[1:3])
    assert torch.allclose(motion_file.flow, expected.flow, atol=1e-3)
    assert motion_file.flow.abs().amax() > 0.5  # the world's RAFT sees the clip's subject move

    flow_preview = extracted["outputs"]["10"]["images"]
    assert len(flow_preview) == len(frames) - 1


def test_extraction_workflow_keeps_the_users_own_photo_and_clip_ready(comfy_server):
    """Its Load Image / Load Video path, unmuted and connected as its note says, runs on a user's cut-out photo
    and clip with DINOv2 and RAFT files of the user's."""
    workflow = shipped("03")
    nodes = {n["type"]: n for n in workflow["nodes"]}
    for kind in ("LoadImage", "InvertMask", "LoadVideo", "GetVideoComponents"):
        assert nodes[kind]["mode"] == 2, kind  # muted: the shipped workflow needs no file of the user's
        nodes[kind]["mode"] = 0
    prompt = to_api(workflow, comfy_server.object_info())
    ids = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    prompt[ids["CustVid_SubjectRepresentation"]]["inputs"].update(
        images=[ids["LoadImage"], 0], masks=[ids["InvertMask"], 0], resolution=448, fit="pad")
    prompt[ids["CustVid_MotionRepresentation"]]["inputs"]["frames"] = [ids["GetVideoComponents"], 0]
    prompt[ids["LoadImage"]]["inputs"]["image"] = SUBJECT_PHOTO
    prompt[ids["LoadVideo"]]["inputs"]["file"] = MOTION_CLIP
    prompt[ids["CustVid_LoadDINOv2"]]["inputs"]["dino_name"] = "dinov2-base/model.safetensors"
    prompt[ids["CustVid_LoadRAFT"]]["inputs"]["raft_name"] = RAFT_FILE
    del prompt[ids["CustVid_WorldCaseData"]]
    for node in prompt.values():
        if node["class_type"] == "CustVid_SaveRepresentation":
            node["inputs"]["file_name"] = "own/" + node["inputs"]["file_name"]
    result = comfy_server.run(prompt)
    assert result["ok"], result["error"]
    base = comfy_server.base
    subject_file = load_representation(reps_dir(comfy_server) / "own" / "my_subject.safetensors", "subject")
    motion_file = load_representation(reps_dir(comfy_server) / "own" / "my_motion.safetensors", "motion")

    rgba = torch.from_numpy(__import__("numpy").array(Image.open(base / "input" / SUBJECT_PHOTO))).float() / 255
    dino = load_dinov2(base / "models" / "custvid" / "dino" / "dinov2-base")
    expected = extract_subject(dino, rgba[None, ..., :3], rgba[None, ..., 3], resolution=448, **quiet)
    assert subject_file.has_masks and subject_file.grid == (32, 32)
    assert subject_file.patch_tokens.shape[-1] == TINY_DINO["hidden_size"]
    assert torch.allclose(subject_file.patch_tokens, expected.patch_tokens, atol=1e-3)
    assert torch.allclose(subject_file.object_features, expected.object_features, atol=1e-3)

    frames = read_video(base / "input" / MOTION_CLIP)
    raft = load_raft(base / "models" / "custvid" / "raft" / RAFT_FILE)
    expected = extract_motion(raft, frames, iterations=12, max_side=512, **quiet)
    assert motion_file.flow.shape == (len(frames) - 1, 2, *example_clip()[0].shape[1:3])
    assert torch.allclose(motion_file.flow, expected.flow, atol=1e-3)


def test_saved_representations_load_preview_and_save_again(comfy_server, extracted):
    prompt = {
        "1": {"class_type": "CustVid_LoadSubjectRepresentation", "inputs": {"representation_name": "my_subject.safetensors"}},
        "2": {"class_type": "CustVid_SaveRepresentation", "inputs": {"representation": ["1", 0], "file_name": "copies/subject"}},
        "3": {"class_type": "CustVid_LoadMotionRepresentation", "inputs": {"representation_name": "my_motion.safetensors"}},
        "4": {"class_type": "CustVid_FlowPreview", "inputs": {"motion_representation": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "custvid_flow"}},
    }
    result = comfy_server.run(prompt)
    assert result["ok"], result["error"]
    original = load_representation(reps_dir(comfy_server) / "my_subject.safetensors")
    copy = load_representation(reps_dir(comfy_server) / "copies" / "subject.safetensors")
    assert torch.equal(original.patch_tokens, copy.patch_tokens)
    saved = sorted((comfy_server.base / "output").glob("custvid_flow_*.png"))
    assert len(saved) == original_pairs(comfy_server)


def original_pairs(server):
    return load_representation(reps_dir(server) / "my_motion.safetensors").flow.shape[0]


def _graph(**nodes):
    return {k: {"class_type": t, "inputs": i} for k, (t, i) in nodes.items()}


PHOTO = ("LoadImage", {"image": SUBJECT_PHOTO})
CLIP = ("LoadVideo", {"file": MOTION_CLIP})
FRAMES = ("GetVideoComponents", {"video": ["clip", 0]})
DINO = ("CustVid_LoadDINOv2", {"dino_name": "dinov2-base/model.safetensors", "precision": "auto"})
RAFT = ("CustVid_LoadRAFT", {"raft_name": "tiny_raft_small.pth"})
SUBJECT = {"resolution": 448, "fit": "pad", "batch_size": 4}
MOTION = {"iterations": 4, "max_side": 512, "batch_size": 4}


def save(name, source):
    return ("CustVid_SaveRepresentation", {"representation": [source, 0], "file_name": name})


BAD_INPUTS = {
    "one frame for motion": (_graph(
        photo=PHOTO, raft=RAFT,
        rep=("CustVid_MotionRepresentation", {"raft": ["raft", 0], "frames": ["photo", 0], **MOTION}),
        out=save("bad_one_frame", "rep")), "frames: only 1 given. Expected at least 2 images"),
    "mask count unlike the images'": (_graph(
        photo=PHOTO, clip=CLIP, frames=FRAMES, dino=DINO,
        rep=("CustVid_SubjectRepresentation", {"dino": ["dino", 0], "images": ["frames", 0],
                                               "masks": ["photo", 1], **SUBJECT}),
        out=save("bad_masks", "rep")), "masks: 1 masks were given for 6 images"),
    "mask size unlike the frames'": (_graph(
        clip=CLIP, frames=FRAMES, raft=RAFT,
        small=("ImageScale", {"image": ["frames", 0], "upscale_method": "nearest-exact", "width": 32,
                              "height": 32, "crop": "disabled"}),
        mask=("ImageToMask", {"image": ["small", 0], "channel": "red"}),
        rep=("CustVid_MotionRepresentation", {"raft": ["raft", 0], "frames": ["frames", 0],
                                              "masks": ["mask", 0], **MOTION}),
        out=save("bad_mask_size", "rep")), "masks: mask 0 is (32, 32) but its image is (64, 96)"),
    "weights of another architecture": (_graph(
        photo=PHOTO, dino=("CustVid_LoadDINOv2", {"dino_name": "raft_in_dino_folder.safetensors", "precision": "auto"}),
        rep=("CustVid_SubjectRepresentation", {"dino": ["dino", 0], "images": ["photo", 0], **SUBJECT}),
        out=save("bad_arch", "rep")), "dino_name: 'raft_in_dino_folder.safetensors' does not look like DINOv2"),
    "corrupt file": (_graph(
        clip=CLIP, frames=FRAMES, raft=("CustVid_LoadRAFT", {"raft_name": "corrupt.pth"}),
        rep=("CustVid_MotionRepresentation", {"raft": ["raft", 0], "frames": ["frames", 0], **MOTION}),
        out=save("bad_corrupt", "rep")), "raft_name: 'corrupt.pth' could not be read"),
    "absurd resolution": (_graph(
        photo=PHOTO, dino=DINO,
        rep=("CustVid_SubjectRepresentation", {"dino": ["dino", 0], "images": ["photo", 0],
                                               **dict(SUBJECT, resolution=100000)}),
        out=save("bad_resolution", "rep")), "resolution"),
    "resolution off the patch grid": (_graph(
        photo=PHOTO, dino=DINO,
        rep=("CustVid_SubjectRepresentation", {"dino": ["dino", 0], "images": ["photo", 0],
                                               **dict(SUBJECT, resolution=450)}),
        out=save("bad_grid", "rep")), "resolution: 450 is not usable with patch size 14"),
    "file name escaping the folder": (_graph(
        photo=PHOTO, dino=DINO,
        rep=("CustVid_SubjectRepresentation", {"dino": ["dino", 0], "images": ["photo", 0], **SUBJECT}),
        out=save("../../bad_escape", "rep")), "file_name: '../../bad_escape.safetensors' points outside"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_writes_nothing(comfy_server, case):
    prompt, message = BAD_INPUTS[case]
    before = {p for p in comfy_server.base.rglob("*") if p.is_file()}
    result = comfy_server.run(prompt)
    assert not result["ok"]
    assert message in result["error"], result["error"]
    written = {p for p in comfy_server.base.rglob("*") if p.is_file()} - before
    assert not [p for p in written if "bad_" in p.name or p.suffix == ".tmp"], written
    assert comfy_server.alive()
