"""The Wan 2.1 workflows as shipped, run in ComfyUI on a tiny Wan 2.1 checkpoint, a tiny Wan 2.1 VAE and (for
DualReal's) a CLIP vision model (ComfyUI's own architectures, random weights) saved under the file names the
workflows name.

One part is replaced: umt5-xxl has a fixed 5.7B-parameter configuration and its tokenizer ships inside its
weights, so the shapes world's text encoder (conditioning of the same width, 4096) stands in for
CLIPLoader + CLIPTextEncode, with the prompts' words outside its vocabulary left out. Steps, frame sizes
and training steps are shortened; everything else runs as the user would queue it."""

import os
import stat
from pathlib import Path

import pytest
import torch
from comfy_host import MOTION_CLIP, SUBJECT_PHOTO, import_comfy, tiny_wan_vae_weights, tiny_world
from workflow_api import shipped, to_api

from custvid_core.world.text import VOCABULARY

WORLD_TEXT = "custvid_shapes_world_text.safetensors"
FALLBACK_PROMPT = "red circle moving right"
# The SynMotion workflow's words and the world's words that stand in for them, so that its captions, subject and motion
# words, new subject and trigger words stay each other's as in the workflow.
STAND_INS = {"a man": "red circle", "waving his arms": "moving right", "a panda": "blue square", "sks dog": "sks"}
WORLD_PRIOR_PROMPTS = "blue striped square | moving up\ngreen triangle | moving left"


@pytest.fixture(scope="module")
def wan_server(comfy_server):
    """The session's ComfyUI with a tiny Wan 2.1 and a tiny Wan 2.1 VAE under the workflows' file names."""
    from safetensors.torch import save_file

    from custvid_core.representations.motion import build_raft
    from custvid_core.world.model import save_world

    models = comfy_server.base / "models"
    unet = _loader_value("09", "UNETLoader")
    vae = _loader_value("09", "VAELoader")
    torch.manual_seed(0)
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    # Four blocks: the subject workflow aligns block 3's hidden states with DINOv2.
    save_world(tiny_world(layers=4), models / "diffusion_models" / unet, comfy_server.base / "unused_text.safetensors")
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_wan_vae_weights().items()}, str(models / "vae" / vae))
    # The motion workflow names the safetensors form of torchvision's RAFT weights (what ComfyUI offers to download).
    raft = _loader_value("07", "CustVid_LoadRAFT")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_raft("raft_large").model.state_dict().items()},
              str(models / "custvid" / "raft" / raft))
    return comfy_server


def _loader_value(number: str, node_type: str, mode: int = 0) -> str:
    nodes = shipped(number)["nodes"]
    return next(n["widgets_values"][0] for n in nodes if n["type"] == node_type and n.get("mode", 0) == mode)


def _world_words(text: str) -> str:
    for wan, world in STAND_INS.items():
        text = text.replace(wan, world)
    words = [w for w in text.replace(",", " ").split() if w in VOCABULARY]
    return " ".join(words) if set(words) - {"a", "an", "the"} else ""


def runnable(number: str, server, workflow: dict | None = None) -> dict:
    """The shipped workflow (or `workflow`) in API form, with the world's text encoder for umt5 and shorter runs."""
    prompt = to_api(workflow or shipped(number), server.object_info())
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":  # the world's CLIP: the stock text encode and every clip input take it
            prompt[node_id] = {"class_type": "CustVid_LoadShapesWorldClip", "inputs": {"text_encoder_name": WORLD_TEXT}}
        elif kind == "CLIPTextEncode":
            text = inputs["text"]
            if isinstance(text, str):  # typed here, not linked from a String node (rewritten below)
                inputs["text"] = "" if "low quality" in text else _world_words(text) or FALLBACK_PROMPT
        elif kind == "PrimitiveString":
            inputs["value"] = _world_words(inputs["value"]) or FALLBACK_PROMPT
        elif kind == "CustVid_SubjectDataset" and "clip" in inputs:
            inputs["trigger_words"] = _world_words(inputs["trigger_words"])
        elif kind == "CustVid_TrainSynMotion":
            inputs.update(subject_words=_world_words(inputs["subject_words"]),
                          motion_words=_world_words(inputs["motion_words"]), steps=2)
        elif kind == "CustVid_SubjectPriorClips":
            inputs.update(prompts=WORLD_PRIOR_PROMPTS, count=2, steps=2)
        elif kind == "CustVid_ApplyTriggerEmbedding":
            inputs["trigger_words"] = _world_words(inputs["trigger_words"])
        elif kind == "ImageScale":
            inputs.update(width=64, height=64)
        elif kind == "ImageFromBatch" and inputs["length"] > 1:  # a clip, not its first frame
            inputs["length"] = 5
        elif kind == "CustVid_BoxSteering":
            inputs.update(prompt=FALLBACK_PROMPT, subject_words="red circle", background_words="")
        elif kind == "EmptyHunyuanLatentVideo":
            inputs.update(width=64, height=64, length=5)
        elif kind in ("KSampler", "BasicScheduler"):
            inputs["steps"] = 2
        elif kind in ("CustVid_TrainSubjectLoRA", "CustVid_TrainMotionLoRA", "CustVid_TrainDualReal",
                      "CustVid_StageBlenderPlot"):
            inputs["steps"] = 2
        elif kind == "LoadImage":
            inputs["image"] = SUBJECT_PHOTO
        elif kind == "LoadVideo":
            inputs["file"] = MOTION_CLIP
    return prompt


def _checkpoint_history(server, run_name: str) -> list[dict]:
    (checkpoint,) = (server.base / "output" / "custvid_training" / run_name).rglob("checkpoint.pt")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["history"]


def test_the_wan_customization_workflows_train_save_and_generate_in_turn(wan_server):
    """Train a subject LoRA, train a motion LoRA, then generate with both at SMRABooth's timing: the three
    Wan workflows one after the other, as a user runs them."""
    loras = wan_server.base / "models" / "loras"
    umask = os.umask(0)  # the server's, inherited from this process
    os.umask(umask)
    for number, saved in (("06", "custvid/my_subject.safetensors"), ("07", "custvid/my_motion.safetensors")):
        prompt = runnable(number, wan_server)
        result = wan_server.run(prompt, timeout=900)
        assert result["ok"], (number, result["error"])
        assert (loras / saved).stat().st_size > 1000
        assert stat.S_IMODE((loras / saved).stat().st_mode) == 0o666 & ~umask  # as the user's other files
        check = next(n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "SaveVideo")
        assert wan_server.saved(check), number
    # The subject workflow gives Subject Dataset its prompt, trigger words and text encoder: every photo step
    # then also trained the trigger words' cross-attention onto the masks.
    history = _checkpoint_history(wan_server, "my_subject")
    assert history and all("token_attention" in record for record in history), history
    result = wan_server.run(runnable("08", wan_server), timeout=900)
    assert result["ok"], result["error"]
    assert wan_server.saved("custvid/wan_customized")


@pytest.mark.parametrize("number, prefix", [("09", "custvid/wan_camera"), ("10", "custvid/wan_box_steering")])
def test_the_wan_control_workflows_run(wan_server, number, prefix):
    result = wan_server.run(runnable(number, wan_server), timeout=600)
    assert result["ok"], result["error"]
    assert wan_server.saved(prefix)


def clip_vision_weights(config_file: str = "clip_vision_config_vitl.json") -> dict:
    """The smallest CLIP vision model ComfyUI's CLIPVisionLoader accepts, with small random weights: ComfyUI picks
    a model's configuration from its state dict's keys (24 layers: ViT-L/14, 768-wide image embeddings), builds
    it from that configuration and skips weight initialisation, so every weight is written. `config_file`: another
    of ComfyUI's configurations (clip_vision_config_h.json: ViT-H/14, what Wan 2.1 I2V reads)."""
    import json

    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops

    config = json.loads((Path(comfy.clip_vision.__file__).parent / config_file).read_text())
    shapes = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast).state_dict()
    g = torch.Generator().manual_seed(0)
    return {k: torch.ones(v.shape, dtype=torch.float16) if "norm" in k and k.endswith(".weight")
            else torch.randn(v.shape, generator=g).mul_(0.02 if v.ndim > 1 or "embedding" in k else 0.002).half()
            for k, v in shapes.items()}


def test_the_wan_dualreal_workflow_trains_with_clip_vision_saves_applies_and_plots(wan_server):
    """Train DualReal with the clip's first frame and the subject's photo through CLIP Vision Encode, save it,
    apply it with the photo's encoding as the reference, generate, and plot the controller's weights."""
    from safetensors.torch import save_file

    from custvid_core.adapters.dualreal import load_dualreal

    import_comfy()
    vision = _loader_value("12", "CLIPVisionLoader")
    (wan_server.base / "models" / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(clip_vision_weights(), str(wan_server.base / "models" / "clip_vision" / vision))
    prompt = runnable("12", wan_server)
    result = wan_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    saved = load_dualreal(wan_server.base / "models" / "custvid" / "dualreal" / "custvid" / "my_dualreal.safetensors")
    # Trained on the CLIP vision embeddings, so Apply DualReal and the plot ran with the photo's as the reference
    # (without one they refuse).
    assert saved.parts["motion"].metadata["spec"]["condition_dim"] == 768
    history = _checkpoint_history(wan_server, "my_dualreal")
    assert len(history) == 2
    assert wan_server.saved("custvid/wan_dualreal")
    previews = [im for o in result["outputs"].values() for im in o.get("images", []) if im["type"] == "temp"]
    assert len(previews) == 2  # the loss graph and the StageBlender plot


def test_the_wan_synmotion_workflow_trains_and_generates_a_new_subject_and_your_subject(wan_server):
    """Prior clips, Train SynMotion, Save LoRA / Save SynMotion Embeddings and the new subject's clip; and, its
    bypassed group turned on, your subject doing the motion: a subject LoRA by the stock loader on the SynMotion MODEL,
    Apply Trigger Embedding and Apply SynMotion Embeddings on one prompt."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from custvid_core.adapters.embedding import LearnedTrigger, save_trigger_embedding
    from custvid_core.adapters.synmotion import load_synmotion

    workflow = shipped("14")
    bypassed = [n for n in workflow["nodes"] if n.get("mode", 0) == 4]
    assert {n["type"] for n in bypassed} >= {"LoraLoaderModelOnly", "CustVid_ApplyTriggerEmbedding", "SaveVideo"}
    assert to_api(workflow, wan_server.object_info()).keys().isdisjoint(str(n["id"]) for n in bypassed)
    for node in bypassed:
        node["mode"] = 0
    models = wan_server.base / "models"
    subject_lora = models / "loras" / _loader_value("14", "LoraLoaderModelOnly", mode=4)
    if not subject_lora.exists():  # workflow 06's, where its test ran first; else a random one
        with safe_open(str(models / "diffusion_models" / _loader_value("14", "UNETLoader")), "pt") as f:
            out_dim, in_dim = f.get_slice("blocks.0.ffn.0.weight").get_shape()
        g = torch.Generator().manual_seed(0)
        subject_lora.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v for b in range(4) for k, v in (
            (f"diffusion_model.blocks.{b}.ffn.0.lora_down.weight", torch.randn(4, in_dim, generator=g) * 0.1),
            (f"diffusion_model.blocks.{b}.ffn.0.lora_up.weight", torch.randn(out_dim, 4, generator=g) * 0.1))},
                  str(subject_lora))
    trigger = _loader_value("14", "CustVid_LoadTriggerEmbedding", mode=4)
    save_trigger_embedding(models / "custvid" / "trigger_embeddings" / trigger,
                           LearnedTrigger(torch.randn(1, 4096, generator=torch.Generator().manual_seed(1)), "sks"))

    result = wan_server.run(runnable("14", wan_server, workflow), timeout=900)
    assert result["ok"], result["error"]
    assert (models / "loras" / "custvid" / "my_synmotion.safetensors").stat().st_size > 1000
    learned = load_synmotion(models / "custvid" / "synmotion" / "custvid" / "my_synmotion.safetensors")
    assert (learned.subject_words, learned.motion_words) == ("red circle", "moving right")
    history = _checkpoint_history(wan_server, "my_synmotion")
    assert len(history) == 2
    assert wan_server.saved("custvid/wan_synmotion_0")  # the new subject's clip
    assert wan_server.saved("custvid/wan_synmotion_my_subject")
