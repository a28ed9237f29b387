"""The shapes world inside ComfyUI: the stock UNETLoader loads it as Wan 2.1, and stock samplers
generate clips with it whose content the world's measurements recognise."""

import numpy as np
import pytest
import torch
from comfy_host import import_comfy, import_pack
from PIL import Image
from workflow_api import inputs_of, shipped, shipped_before, to_api

from custvid_core.media import read_video
from custvid_core.world.measures import camera_pan, describe_clip, track
from custvid_core.world.model import MODEL_FILE, TEXT_FILE, load_world


def test_unet_loader_detects_wan21_and_computes_what_the_library_computes():
    import_comfy()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(MODEL_FILE))
    assert type(patcher.model).__name__ == "WAN21"
    assert type(patcher.model.model_config).__name__ == "WAN21_T2V"
    world = load_world()
    torch.manual_seed(0)
    z = torch.randn(2, 16, world.spec.frames, world.spec.size // 2, world.spec.size // 2)
    context = world.text(["red striped circle moving right", ""]).detach()
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        denoised = patcher.model.apply_model(z, sigma, c_crossattn=context)
        v = world.backbone.forward(z, sigma, context)
    assert torch.allclose(denoised, z - sigma.view(-1, 1, 1, 1, 1) * v, atol=1e-4)


def test_vae_round_trips_through_comfys_latent_normalisation():
    from custvid_core.world import latent
    from custvid_core.world.scene import Scene, render

    import_comfy()
    import comfy.latent_formats

    vae = import_pack().nodes.world_nodes.WorldVAE()
    frames = render(Scene()).frames
    raw = vae.encode(frames)
    # The sampler normalises with Wan 2.1's statistics; the model must then see the world's latent.
    assert torch.allclose(comfy.latent_formats.Wan21().process_in(raw), latent.encode(frames), atol=1e-5)
    decoded = vae.decode(raw)
    assert decoded.shape == (1, 5, 32, 32, 3)
    assert torch.allclose(decoded[0], frames, atol=1e-5)


def _frames_prompt(prompt, seed, deprecated=False):
    """The world through ComfyUI's own CLIPTextEncode (the negative: ConditioningZeroOut), or through the
    deprecated world loader and text encode that saved workflows hold."""
    if deprecated:
        encoders = {
            "world": {"class_type": "CustVid_LoadShapesWorld", "inputs": {"text_encoder_name": TEXT_FILE.name}},
            "pos": {"class_type": "CustVid_WorldTextEncode", "inputs": {"world_text": ["world", 0], "prompt": prompt}},
            "neg": {"class_type": "CustVid_WorldTextEncode", "inputs": {"world_text": ["world", 0], "prompt": ""}}}
    else:
        encoders = {
            "world": {"class_type": "CustVid_LoadShapesWorldClip", "inputs": {"text_encoder_name": TEXT_FILE.name}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["world", 0], "text": prompt}},
            "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}}}
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_FILE.name, "weight_dtype": "default"}},
        "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["unet", 0], "shift": 3.0}},
        **encoders,
        "latent": {"class_type": "CustVid_WorldEmptyLatent", "inputs": {"frames": 5, "size": 32, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {"model": ["shift", 0], "positive": ["pos", 0],
                                                        "negative": ["neg", 0], "latent_image": ["latent", 0],
                                                        "seed": seed, "steps": 30, "cfg": 4.0, "sampler_name": "euler",
                                                        "scheduler": "simple", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["world", 1]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0],
                                                       "filename_prefix": f"world_{seed}_{prompt.replace(' ', '_')}"
                                                                          + ("_old" if deprecated else "")}},
    }


def _saved_frames(server, result, node="save"):
    return torch.stack([torch.from_numpy(np.array(Image.open(server.base / "output" / im["subfolder"] /
                                                             im["filename"]))).float() / 255
                        for im in result["outputs"][node]["images"]])


def test_clip_text_encode_with_the_worlds_clip_makes_what_the_deprecated_nodes_made(comfy_server):
    """The world's text encoder as a stock CLIP: CLIPTextEncode + ConditioningZeroOut give the very clip the
    deprecated Load Shapes World + Shapes World Text Encode give (an empty prompt is all zeros)."""
    new = comfy_server.run(_frames_prompt("blue circle moving left", seed=7))
    old = comfy_server.run(_frames_prompt("blue circle moving left", seed=7, deprecated=True))
    assert new["ok"] and old["ok"], (new["error"], old["error"])
    assert torch.equal(_saved_frames(comfy_server, new), _saved_frames(comfy_server, old))


def test_stock_samplers_generate_what_the_prompt_asks(comfy_server):
    prompts = ["red circle moving right", "blue square moving down", "yellow cross moving left",
               "green triangle moving up"]
    found = []
    for i, prompt in enumerate(prompts):
        result = comfy_server.run(_frames_prompt(prompt, seed=i))
        assert result["ok"], result["error"]
        frames = _saved_frames(comfy_server, result)
        assert frames.shape == (5, 32, 32, 3)
        seen = describe_clip(frames)
        found.append((seen.colour == prompt.split()[0], seen.direction == prompt.split()[-1]))
    assert sum(c for c, _ in found) >= 3, found
    assert sum(d for _, d in found) >= 2, found


def test_shipped_world_workflow_runs(comfy_server):
    workflow = shipped("02")
    result = comfy_server.run(to_api(workflow, comfy_server.object_info()))
    assert result["ok"], result["error"]
    videos = list((comfy_server.base / "output" / "custvid").glob("shapes_world*"))
    assert videos and videos[0].stat().st_size > 1000


def test_shipped_customization_workflow_trains_saves_and_generates(comfy_server):
    """The world customization workflow, shortened (3 subject and 2 motion training steps, 2 sampling steps),
    end to end."""
    workflow = shipped("01")
    prompt = to_api(workflow, comfy_server.object_info())
    for node in prompt.values():
        if node["class_type"] in ("CustVid_TrainSubjectLoRA", "CustVid_TrainMotionLoRA"):
            steps = 3 if node["class_type"] == "CustVid_TrainSubjectLoRA" else 2
            node["inputs"].update(steps=steps, run_name=node["inputs"]["run_name"] + "_host_test")
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    result = comfy_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    loras = comfy_server.base / "models" / "loras" / "custvid"
    saved = {p.name for p in loras.glob("world_*.safetensors")}  # the server's other tests save theirs there too
    assert {"world_motion.safetensors", "world_subject.safetensors"} <= saved
    assert list((comfy_server.base / "output" / "custvid").glob("world_customized*"))
    checkpoint = comfy_server.base / "output" / "custvid_training" / "world_subject_host_test" / "checkpoint.pt"
    # The subject's three kinds of step: the stillness LoRA's stills, the photos, the preservation clips.
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert [next(k for k in ("stillness", "region", "preservation") if k in r) for r in history] == \
        ["stillness", "region", "preservation"]
    # The photo step uses the world's DINOv2 (SuRA) and the trigger word (subject-token attention).
    assert {"alignment", "token_attention"} <= set(history[1])
    motion = comfy_server.base / "output" / "custvid_training" / "world_motion_host_test" / "checkpoint.pt"
    # The motion LoRA learns three clips with the world's RAFT flow (MoRA) after a spatial step.
    motion_history = torch.load(motion, weights_only=True)["history"]
    assert "spatial" in motion_history[0] and "alignment" in motion_history[1]


@pytest.fixture(autouse=True)
def _world_weights_present():
    if not MODEL_FILE.exists():
        pytest.fail(f"{MODEL_FILE} is missing: the shapes world ships with the repository")


@pytest.mark.parametrize("number, prefix", [("04", "world_camera"), ("05", "world_box_steering")])
def test_shipped_control_workflows_run(comfy_server, number, prefix):
    """The camera (SamplerCustomAdvanced + Camera by Latent Shift) and box-steering world workflows, with
    fewer sampling steps, end to end through ComfyUI's own samplers."""
    prompt = to_api(shipped(number), comfy_server.object_info())
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            node["inputs"]["steps"] = 6
    result = comfy_server.run(prompt, timeout=600)
    assert result["ok"], result["error"]
    assert comfy_server.saved("custvid/" + prefix)


def test_shipped_camera_workflow_pans_the_background_as_commanded(comfy_server):
    """The world camera workflow as shipped (the panning world, its window): the pan measured on the saved
    video's background is the commanded one within 10%."""
    prompt = to_api(shipped("04"), comfy_server.object_info())
    camera = inputs_of(prompt, "CustVid_CameraShiftSamplerV2")
    scale = int(inputs_of(prompt, "ImageScaleBy")["scale_by"])
    inputs_of(prompt, "SaveVideo")["filename_prefix"] = "custvid/pan"
    result = comfy_server.run(prompt, timeout=600)
    assert result["ok"], result["error"]
    video = sorted((comfy_server.base / "output" / "custvid").glob("pan_*"))[-1]
    frames = read_video(video)[:, ::scale, ::scale]
    commanded = torch.tensor([camera["pan_x"], camera["pan_y"]]) * frames.shape[2]
    measured = camera_pan(frames, track(frames))[-1]
    assert float((measured - commanded).norm() / commanded.norm()) < 0.1, (measured, commanded)


OLD_WORKFLOWS = "8dfa241"  # the shipped workflows before the world's CLIP and the camera without latent_layout


def _old_workflow(number: str) -> dict:
    return shipped_before(number, OLD_WORKFLOWS)


@pytest.mark.parametrize("number", ["01", "02", "03", "04", "05"])
def test_workflows_saved_before_the_worlds_clip_still_connect(comfy_server, number):
    from workflow_api import check_links

    info = comfy_server.object_info()
    workflow = _old_workflow(number)
    # Only the deprecated world_text sockets are gone from the nodes in use (the browser still sends their links).
    assert all(p.endswith("has no input world_text") for p in check_links(workflow, info)), check_links(workflow, info)
    to_api(workflow, info)  # every saved widget value has its input


def test_a_camera_workflow_saved_with_latent_layout_makes_what_the_shipped_one_makes(comfy_server):
    """The old camera workflow (the deprecated nodes, latent_layout chosen) and the shipped one (the layout read
    from the world's conditioning) give the same video, with fewer steps."""
    info = comfy_server.object_info()
    videos = []
    for name, workflow in (("old", _old_workflow("04")), ("new", shipped("04"))):
        prompt = to_api(workflow, info)
        inputs_of(prompt, "BasicScheduler")["steps"] = 6
        inputs_of(prompt, "SaveVideo")["filename_prefix"] = f"custvid/pan_{name}_"
        result = comfy_server.run(prompt, timeout=600)
        assert result["ok"], result["error"]
        videos.append(read_video(comfy_server.saved(f"custvid/pan_{name}_")[-1]))
    assert torch.equal(*videos)


def test_a_box_steering_workflow_saved_with_world_text_links_still_runs(comfy_server):
    """Old workflow 05: Box Steering's saved world_text link (a socket it no longer shows), fed by the deprecated
    loader, is sent as the frontend sends it and still finds the subject words."""
    prompt = to_api(_old_workflow("05"), comfy_server.object_info())
    inputs_of(prompt, "KSampler")["steps"] = 6
    inputs_of(prompt, "SaveVideo")["filename_prefix"] = "custvid/old_box_steering"
    result = comfy_server.run(prompt, timeout=600)
    assert result["ok"], result["error"]
    assert comfy_server.saved("custvid/old_box_steering")
