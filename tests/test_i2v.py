"""Training on Wan image-to-video: datasets carry each item's start image (encoded as WanImageToVideo encodes it) and
CLIP features, and the recipes pass them to the model's forward; a text-to-video model trains as before."""

from dataclasses import replace

import pytest
import torch

from custvid_core.backbones import describe
from custvid_core.backbones.wan import DIFFUSERS_TEXT_TOKENS
from custvid_core.errors import InputError
from custvid_core.images import hue_rotations
from custvid_core.training import MotionSettings, OptimSettings, SubjectSettings, train_motion, train_subject
from custvid_core.training.datasets import append_clips, clip_set, converted, start_image_video, subject_set

TEXT_DIM, CLIP_DIM = 64, 24


def tiny_i2v_wan(clip_features=True):
    """A tiny diffusers Wan I2V: 36 input channels and, with `clip_features`, Wan 2.1's CLIP image embedding."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    image = dict(image_dim=CLIP_DIM, added_kv_proj_dim=32) if clip_features else {}
    return describe(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                          in_channels=36, out_channels=16, text_dim=TEXT_DIM, freq_dim=32,
                                          ffn_dim=64, num_layers=2, **image).eval())


def encode(clips: torch.Tensor) -> torch.Tensor:
    """A causal stand-in for Wan's VAE: `[N, 1 + 4k, H, W, 3]` -> `[N, 16, 1 + k, H/8, W/8]`, the first latent frame
    from the first frame alone, each later one from its 4 frames."""
    n, f, h, w, _ = clips.shape
    x = clips.permute(0, 4, 1, 2, 3)
    x = torch.nn.functional.avg_pool3d(x, (1, 8, 8))
    groups = [x[:, :, :1]] + [x[:, :, i:i + 4].mean(2, keepdim=True) for i in range(1, f, 4)]
    x = torch.cat(groups, 2)
    return torch.cat([x * (c + 1) for c in range(16 // 3 + 1)], 1)[:, :16]


def frames(n=2, f=5, seed=0):
    return torch.rand(n, f, 16, 16, 3, generator=torch.Generator().manual_seed(seed))


def context(n=1):
    return torch.randn(n, DIFFUSERS_TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(1))


def features(n=1):
    return torch.randn(n, 257, CLIP_DIM, generator=torch.Generator().manual_seed(2))


def spy(backbone):
    """Records the image condition of every forward."""
    seen, original = [], backbone.forward

    def forward(x, sigma, context, image=None):
        seen.append((x.detach().clone(), image))
        return original(x, sigma, context, image)

    backbone.forward = forward
    return seen


def _quick(settings, steps=3):
    return replace(settings, optim=OptimSettings(steps=steps, lr=1e-3, warmup=1, checkpoint_every=10))


def test_a_start_image_is_the_image_then_grey_frames():
    image = torch.rand(4, 6, 3)
    clip = start_image_video(image, 5)
    assert clip.shape == (5, 4, 6, 3) and torch.equal(clip[0], image) and bool((clip[1:] == 0.5).all())


def test_clips_encode_each_first_frame_as_a_start_image_hue_copies_their_own():
    clips = frames()
    data = clip_set(clips, encode, context(), stills=2, hue_copies=1, start_images=True)
    assert data.start.shape == data.latents.shape == (4, 16, 2, 2, 2)
    versions = [v for c in clips for v in hue_rotations(c, 1)]
    for i, version in enumerate(versions):
        assert torch.allclose(data.start[i], encode(start_image_video(version[0], 5)[None])[0])
    # A start image fixes the first latent frame (the VAE is causal) and differs from the clip after it.
    assert torch.allclose(data.start[:, :, 0], data.latents[:, :, 0])
    assert not torch.allclose(data.start[:, :, 1], data.latents[:, :, 1])
    assert clip_set(clips, encode, context(), stills=0).start is None  # off by default: text-to-video


def test_motion_training_passes_each_clips_start_image_and_features_and_a_stills_own():
    backbone = tiny_i2v_wan()
    data = clip_set(frames(3), encode, context(), stills=2, start_images=True, clip_features=features(3))
    seen = spy(backbone)
    train_motion(backbone, data, _quick(MotionSettings(rank=2, spatial_rank=2, alignment_weight=0.0)))
    assert len(seen) == 3
    for x, image in seen:
        assert image.latents.shape == (1, 20, *x.shape[2:])
        mask, start = image.latents[:, :4], image.latents[:, 4:]
        assert bool((mask[:, :, 0] == 1).all()) and bool((mask[:, :, 1:] == 0).all())  # WanImageToVideo's layout
        if x.shape[2] == 1:  # a still of the spatial phase: its own start image
            assert any(torch.allclose(start[0], s) for s in data.stills.flatten(0, 1))
        else:
            (row,) = [i for i in range(3) if torch.allclose(start[0], data.start[i])]
            assert torch.equal(image.clip_features[0], data.clip_features[row])


def test_subject_photos_are_their_own_start_images_and_moving_clips_start_from_their_first_frame():
    backbone = tiny_i2v_wan(clip_features=False)
    photos = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(2, 16, 16)
    masks[:, 4:12, 4:12] = 1
    data = subject_set(photos, encode, context(), masks, moving_clips=1, moving_frames=5, frame_step=4,
                       start_images=True)
    assert data.start is data.latents and data.moving.start.shape == data.moving.latents.shape
    seen = spy(backbone)
    train_subject(backbone, data, _quick(SubjectSettings(rank=2, alignment_weight=0.0, token_attention_weight=0.0,
                                                         moving_share=0.5), steps=6))
    starts = {x.shape[2] for x, _ in seen}
    assert starts == {1, 2}  # photos and moving clips both learned
    for x, image in seen:
        items = data if x.shape[2] == 1 else data.moving
        assert any(torch.allclose(image.latents[0, 4:], s) for s in items.start)
        assert image.clip_features is None


def test_a_text_to_video_model_learns_the_same_lora_from_clips_with_start_images():
    from builders import tiny_diffusers_wan

    g = torch.Generator().manual_seed(0)
    clips = frames(2)
    text = torch.randn(1, 5, 64, generator=g)
    plain, with_start = (clip_set(clips, encode, text, stills=2, start_images=s) for s in (False, True))
    trained = [train_motion(describe(tiny_diffusers_wan()), d, _quick(MotionSettings(rank=2, spatial_rank=2)))
               for d in (plain, with_start)]
    assert trained[0].tensors.keys() == trained[1].tensors.keys()
    assert all(torch.equal(trained[0].tensors[k], trained[1].tensors[k]) for k in trained[0].tensors)


def test_image_to_video_data_is_refused_where_incomplete_naming_the_input():
    clips = frames(2)
    plain = clip_set(clips, encode, context(), stills=0)
    without_features = clip_set(clips, encode, context(), stills=0, start_images=True)
    settings = _quick(MotionSettings(rank=2, spatial_rank=0, alignment_weight=0.0), steps=1)
    with pytest.raises(InputError, match="clips: encoded without start images, and this is an image-to-video Wan"):
        train_motion(tiny_i2v_wan(clip_features=False), plain, settings)
    with pytest.raises(InputError, match="clips: encoded without CLIP vision features"):
        train_motion(tiny_i2v_wan(), without_features, settings)
    with pytest.raises(InputError, match="hue_copies"):
        clip_set(clips, encode, context(), hue_copies=1, start_images=True, clip_features=features())
    with pytest.raises(InputError, match="image_to_video: off with CLIP features"):
        clip_set(clips, encode, context(), clip_features=features())
    with pytest.raises(InputError, match="clip_vision_output: features of shape"):
        clip_set(clips, encode, context(), start_images=True, clip_features=features(3))
    with pytest.raises(InputError, match="image_to_video: on for some clips and off for others"):
        append_clips(without_features, plain)
    with pytest.raises(InputError, match="clip_vision_output: connected for some clips"):
        append_clips(without_features, clip_set(clips, encode, context(), stills=0, start_images=True,
                                                 clip_features=features()))


def test_joined_and_converted_sets_keep_their_start_images_and_features():
    a = clip_set(frames(1, seed=1), encode, context(), stills=0, start_images=True, clip_features=features())
    b = clip_set(frames(2, seed=2), encode, context(), stills=0, start_images=True, clip_features=features(2))
    joined = append_clips(a, b)
    assert torch.equal(joined.start, torch.cat([a.start, b.start]))
    assert torch.equal(joined.clip_features, torch.cat([a.clip_features, b.clip_features]))
    doubled = converted(joined, lambda t: t * 2)
    assert torch.equal(doubled.start, joined.start * 2) and torch.equal(doubled.clip_features, joined.clip_features)


def test_dualreal_and_synmotion_refuse_an_image_to_video_model_naming_it():
    from custvid_core.training import DualRealSettings, SubjectSet, SynMotionSettings, train_dualreal, train_synmotion

    backbone = tiny_i2v_wan(clip_features=False)
    clips = clip_set(frames(1), encode, context(), stills=0, start_images=True)
    photos = SubjectSet(clips.latents[:, :, :1], context(), start=clips.latents[:, :, :1])
    with pytest.raises(InputError, match="model: an image-to-video Wan .*DualReal trains text-to-video models only"):
        train_dualreal(backbone, photos, clips, DualRealSettings())
    with pytest.raises(InputError, match="model: an image-to-video Wan .*SynMotion trains text-to-video models only"):
        train_synmotion(backbone, clips, [], context()[0, :2], None, SynMotionSettings(prior=False))
