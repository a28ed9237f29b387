"""Wan image-to-video in ComfyUI: the description's forward on ComfyUI's own I2V WanModel agrees with diffusers'; the
dataset nodes encode a start image as WanImageToVideo does; and workflow 15 as shipped trains a motion LoRA on a tiny
Wan 2.1 I2V (CLIP image embedding, ComfyUI's CLIP vision ViT-H) and a tiny Wan 2.2 I2V (none), files ComfyUI's own
loaders detect, and animates an image with it through WanImageToVideo (its run shortened as
test_host_wan_workflows.py shortens the others)."""

import pytest
import torch
from comfy_host import example_clip, import_comfy, import_pack, tiny_wan_vae_weights, tiny_world
from test_host_backbone import TINY, comfy_wan
from test_host_wan_workflows import _checkpoint_history, _loader_value, clip_vision_weights, runnable, wan_server

from custvid_core.backbones import describe, diffusers_to_native_key
from custvid_core.backbones.wan import DIFFUSERS_TEXT_TOKENS, ImageCondition
from custvid_core.errors import InputError

CLIP_WIDTH = 1280  # ComfyUI's Wan 2.1 I2V embeds CLIP ViT-H/14's 1280-wide penultimate hidden states


def tiny_i2v_pair(clip_features: bool):
    """The same random weights in ComfyUI's WanModel and diffusers' WanTransformer3DModel, as image-to-video: 36 input
    channels and, with `clip_features` (Wan 2.1 I2V), the CLIP image embedding and each block's image keys and
    values (without: Wan 2.2 I2V's layout)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    image = dict(image_dim=CLIP_WIDTH, added_kv_proj_dim=TINY["dim"]) if clip_features else {}
    theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=TINY["num_heads"],
                                   attention_head_dim=TINY["dim"] // TINY["num_heads"], in_channels=36,
                                   out_channels=16, text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"],
                                   ffn_dim=TINY["ffn_dim"], num_layers=TINY["num_layers"], cross_attn_norm=True,
                                   qk_norm="rms_norm_across_heads", eps=1e-6, **image).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    import_comfy()
    import comfy.ldm.wan.model
    import comfy.ops

    native = comfy.ldm.wan.model.WanModel(model_type="i2v" if clip_features else "t2v", patch_size=(1, 2, 2),
                                          cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init,
                                          **{**TINY, "in_dim": 36}).eval()
    sd = {diffusers_to_native_key(k): v for k, v in theirs.state_dict().items()}
    missing, unexpected = native.load_state_dict(sd, strict=False)
    assert not unexpected and all("rope" in k for k in missing), (missing, unexpected)
    return describe(native), describe(theirs)


def _inputs(clip_features: bool, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 16, 3, 6, 8, generator=g)
    context = torch.randn(batch, DIFFUSERS_TEXT_TOKENS, TINY["text_dim"], generator=g)
    start = torch.randn(batch, 16, 3, 6, 8, generator=g)
    features = torch.randn(batch, 257, CLIP_WIDTH, generator=g) if clip_features else None
    return x, context, ImageCondition.start_frame(start, features)


@pytest.mark.parametrize("clip_features", [True, False], ids=["wan21_i2v", "wan22_i2v"])
def test_native_and_diffusers_image_to_video_forwards_agree(clip_features):
    native, theirs = tiny_i2v_pair(clip_features)
    assert native.condition_channels == theirs.condition_channels == 20
    assert native.takes_clip_features == theirs.takes_clip_features == clip_features
    x, context, image = _inputs(clip_features)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad(), native.capture(1) as h_native, theirs.capture(1) as h_theirs:
        v_native = native.forward(x, sigma, context, image)
        v_theirs = theirs.forward(x, sigma, context, image)
    assert v_native.shape == x.shape
    assert torch.allclose(h_native[1], h_theirs[1], atol=1e-4)
    assert torch.allclose(v_native, v_theirs, atol=1e-4)
    # The condition is used: another start image (and, where taken, other CLIP features) changes the prediction.
    with torch.no_grad():
        other = native.forward(x, sigma, context, ImageCondition(image.latents.flip(0), image.clip_features))
        assert (other - v_native).abs().max() > 1e-3
        if clip_features:
            other = native.forward(x, sigma, context, ImageCondition(image.latents, image.clip_features.flip(0)))
            assert (other - v_native).abs().max() > 1e-3


@pytest.mark.parametrize("clip_features", [True, False], ids=["wan21_i2v", "wan22_i2v"])
def test_an_image_to_video_model_without_its_image_inputs_is_refused_naming_them(clip_features):
    for backbone in tiny_i2v_pair(clip_features):
        x, context, image = _inputs(clip_features)
        with pytest.raises(InputError, match="start_image: this is an image-to-video Wan"):
            backbone.forward(x, 0.5, context)
        if clip_features:
            with pytest.raises(InputError, match="clip_vision_output: this Wan 2.1 image-to-video model"):
                backbone.forward(x, 0.5, context, ImageCondition(image.latents))
        with pytest.raises(InputError, match="start_image: a condition of shape"):
            backbone.forward(x, 0.5, context, ImageCondition(image.latents[:, :, :2], image.clip_features))


def test_a_start_image_given_to_a_text_to_video_model_is_refused():
    from test_host_backbone import tiny_pair

    for backbone in tiny_pair():
        x, context, image = _inputs(False, batch=1)
        with pytest.raises(InputError, match="start_image: a start image was given to a text-to-video Wan"):
            backbone.forward(x, 0.5, context[:, :5], image)
    assert describe(comfy_wan(device="meta", **TINY)).condition_channels == 0


WAN22_I2V = "tiny_wan22_i2v.safetensors"
# Workflow 12's test writes a ViT-L under the shipped name clip_vision_h.safetensors (and the server caches what a
# loader loaded by its file name), so the ViT-H that Wan 2.1 I2V needs has a name of its own here.
VIT_H = "tiny_clip_vision_h.safetensors"
__all__ = ["wan_server"]  # the fixture this module's runs build on


def tiny_i2v_weights(clip_features: bool) -> dict:
    """A tiny Wan I2V in ComfyUI's native keys: 36 input channels, and with `clip_features` Wan 2.1 I2V's CLIP image
    embedding of 1280-wide features (ComfyUI detects it as WAN21_I2V), without it Wan 2.2 I2V's layout."""
    image = dict(image_dim=CLIP_WIDTH, added_kv_proj_dim=128) if clip_features else {}
    torch.manual_seed(0)
    model = tiny_world(layers=4, in_channels=36, **image).backbone.model  # workflow 15 aligns block 3
    return {diffusers_to_native_key(k): v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def i2v_server(wan_server):
    """The Wan workflows' server, with the tiny Wan 2.1 I2V under workflow 15's file name, a tiny Wan 2.2 I2V and a
    ViT-H CLIP vision model (random weights)."""
    from safetensors.torch import save_file

    import_comfy()
    models = wan_server.base / "models"
    save_file(tiny_i2v_weights(True), str(models / "diffusion_models" / _loader_value("15", "UNETLoader")))
    save_file(tiny_i2v_weights(False), str(models / "diffusion_models" / WAN22_I2V))
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(clip_vision_weights("clip_vision_config_h.json"), str(models / "clip_vision" / VIT_H))
    return wan_server


def runnable_15(server, unet: str | None = None, clip_vision: bool = True, image_to_video: bool = True,
                run_name: str = "my_i2v_motion") -> dict:
    """Workflow 15 as `runnable` shortens it, sampling 5 frames of 64x64; `unet`: another model file; without
    `clip_vision` nothing takes CLIP vision features (as for Wan 2.2 I2V); `image_to_video` off on the dataset."""
    prompt = runnable("15", server)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "WanImageToVideo":
            inputs.update(width=64, height=64, length=5)
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = VIT_H
        elif kind == "UNETLoader" and unet:
            inputs["unet_name"] = unet
        elif kind == "CustVid_TrainMotionLoRA":
            inputs["run_name"] = run_name
        elif kind == "CustVid_SaveLoRA":
            inputs["filename"] = f"custvid/{run_name}"
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"custvid/{run_name}"
        elif kind == "CustVid_VideoDataset":
            inputs["image_to_video"] = image_to_video
        if not clip_vision:
            inputs.pop("clip_vision_output", None)
    return prompt


def test_the_i2v_workflow_trains_a_motion_lora_on_wan21_i2v_and_animates_an_image(i2v_server):
    result = i2v_server.run(runnable_15(i2v_server), timeout=900)
    assert result["ok"], result["error"]
    assert (i2v_server.base / "models" / "loras" / "custvid" / "my_i2v_motion.safetensors").stat().st_size > 1000
    assert len(_checkpoint_history(i2v_server, "my_i2v_motion")) == 2
    assert i2v_server.saved("custvid/my_i2v_motion")


def test_the_i2v_workflow_trains_on_wan22_i2v_without_clip_vision(i2v_server):
    result = i2v_server.run(runnable_15(i2v_server, WAN22_I2V, clip_vision=False, run_name="my_i2v_motion_22"),
                            timeout=900)
    assert result["ok"], result["error"]
    assert len(_checkpoint_history(i2v_server, "my_i2v_motion_22")) == 2
    assert i2v_server.saved("custvid/my_i2v_motion_22")


def test_workflow_15s_dataset_widgets_keep_their_inputs(i2v_server):
    """The saved widget values land on the inputs they were saved for (buckets' inputs come before image_to_video)."""
    prompt = runnable("15", i2v_server)
    (inputs,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "CustVid_VideoDataset"]
    assert inputs["hue_copies"] == 0 and inputs["buckets"] is False and inputs["image_to_video"] is True


def test_the_i2v_workflow_trains_on_clips_of_two_sizes_in_buckets(i2v_server):
    """Workflow 15 with a second clip of another size chained by add_to, buckets on in both: two buckets, each with its
    clips' start images and CLIP features, trained on Wan 2.1 I2V."""
    prompt = runnable_15(i2v_server, run_name="my_i2v_buckets")
    (dataset_id,) = [k for k, n in prompt.items() if n["class_type"] == "CustVid_VideoDataset"]
    dataset = prompt[dataset_id]["inputs"]
    dataset.update(buckets=True, bucket_width=64, bucket_height=48)
    prompt["wide_frames"] = {"class_type": "ImageScale", "inputs": {"image": dataset["frames"], "upscale_method": "area",
                                                                     "width": 96, "height": 32, "crop": "disabled"}}
    prompt["wide_clip"] = {"class_type": "CustVid_VideoDataset",
                           "inputs": {**dataset, "frames": ["wide_frames", 0], "add_to": [dataset_id, 0]}}
    for node in prompt.values():
        if node["class_type"] == "CustVid_TrainMotionLoRA":
            node["inputs"]["clips"] = ["wide_clip", 0]
    result = i2v_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    assert "\n".join(result["outputs"]["wide_clip"]["text"]).startswith("2 buckets:")
    assert len(_checkpoint_history(i2v_server, "my_i2v_buckets")) == 2


def test_bucketed_clips_start_from_their_fitted_first_frame_as_wan_image_to_video_encodes_it():
    """Video Clips Dataset with buckets and image_to_video on, over ComfyUI's Wan VAE: a clip's start image is
    WanImageToVideo's of its first frame fitted to the bucket, and its CLIP features stay with it."""
    training_nodes = import_pack().nodes.training_nodes
    import comfy.sd
    from comfy_extras.nodes_wan import WanImageToVideo

    from custvid_core.training.buckets import fit_clip

    vae = comfy.sd.VAE(sd=tiny_wan_vae_weights())
    frames = example_clip()[0][:5]  # 64 x 96
    conditioning = [[torch.randn(1, 7, 4096), {}]]
    budget = dict(buckets=True, bucket_width=64, bucket_height=48, image_to_video=True)

    class Vision:  # CLIP Vision Encode's output, as the node reads it
        def __init__(self, seed):
            self.penultimate_hidden_states = torch.randn(1, 257, CLIP_WIDTH, generator=torch.Generator().manual_seed(seed))

    first = training_nodes.VideoDataset.execute(vae, frames, conditioning, clip_vision_output=Vision(0), **budget)
    other = frames[:, 8:56]  # 48 x 96: another aspect ratio
    clips = training_nodes.VideoDataset.execute(vae, other, conditioning, add_to=first.result[0],
                                                clip_vision_output=Vision(1), **budget).result[0]
    assert len(clips.sets) == 2
    for s, label, source, seed in zip(clips.sets, clips.labels, (frames, other), (0, 1)):
        fitted = fit_clip(source, label)
        positive, _, _ = WanImageToVideo.execute(conditioning, conditioning, vae, label.width, label.height,
                                                 label.frames, 1, start_image=fitted[:1]).result
        assert torch.allclose(s.start, positive[0][1]["concat_latent_image"].float(), atol=1e-5)
        assert torch.equal(s.clip_features, Vision(seed).penultimate_hidden_states)


@pytest.mark.parametrize("clip_vision, image_to_video, message", [
    (False, True, "clips: encoded without CLIP vision features"),
    (False, False, "clips: encoded without start images, and this is an image-to-video Wan"),
])
def test_an_i2v_model_refuses_clips_without_what_it_takes(i2v_server, clip_vision, image_to_video, message):
    prompt = runnable_15(i2v_server, clip_vision=clip_vision, image_to_video=image_to_video, run_name="refused")
    result = i2v_server.run(prompt, timeout=900)
    assert not result["ok"] and message in result["error"], result["error"]


def test_the_dataset_encodes_a_clips_first_frame_as_wan_image_to_video_does(tmp_path):
    """Video Clips Dataset's start image and WanImageToVideo's conditioning, through ComfyUI's own WAN21.concat_cond,
    make the same model input (mask channels, then latents); Subject Dataset's photos are their own start images."""
    training_nodes = import_pack().nodes.training_nodes
    import comfy.sd
    from comfy_extras.nodes_wan import WanImageToVideo
    from safetensors.torch import save_file

    vae = comfy.sd.VAE(sd=tiny_wan_vae_weights())
    frames = example_clip()[0][:5]
    conditioning = [[torch.randn(1, 7, 4096), {}]]
    clips = training_nodes.VideoDataset.execute(vae, frames, conditioning, image_to_video=True).result[0]
    positive, _, latent = WanImageToVideo.execute(conditioning, conditioning, vae, frames.shape[2], frames.shape[1],
                                                  frames.shape[0], 1, start_image=frames[:1]).result
    values = positive[0][1]
    assert torch.allclose(clips.start, values["concat_latent_image"].float(), atol=1e-5)
    save_file(tiny_i2v_weights(False), str(tmp_path / "tiny_i2v.safetensors"))
    model = comfy.sd.load_diffusion_model(str(tmp_path / "tiny_i2v.safetensors")).model
    noise = latent["samples"]
    theirs = model.concat_cond(noise=noise, device=noise.device, concat_latent_image=values["concat_latent_image"],
                               concat_mask=values["concat_mask"])
    ours = ImageCondition.start_frame(model.process_latent_in(clips.start)).latents
    assert theirs.shape == ours.shape == (1, 20, *noise.shape[2:])
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    photos = frames[:2]
    subject = training_nodes.SubjectDataset.execute(vae, photos, conditioning, image_to_video=True).result[0]
    assert torch.equal(subject.start, subject.latents)
