"""Wan image-to-video in ComfyUI: the description's forward on ComfyUI's own I2V WanModel agrees with diffusers'."""

import pytest
import torch
from comfy_host import import_comfy
from test_host_backbone import TINY, comfy_wan

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
