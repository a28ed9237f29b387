"""Size and length buckets: how items are fitted, how the sets are built and joined, and how training draws them."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_diffusers_wan

from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.representations.subject import SubjectRepresentation
from custvid_core.training import MotionSettings, OptimSettings, SubjectSettings, train_motion, train_subject
from custvid_core.training.buckets import (
    Bucket,
    BucketRule,
    crop_for,
    fit_clip,
    fit_flow,
    fit_image,
    fit_mask,
    fit_patch_tokens,
)
from custvid_core.training.datasets import (
    Bucketed,
    append_clips,
    append_photos,
    clip_set,
    draw_bucket,
    single_size,
    subject_set,
)

# A small budget: its buckets are 32x96, 48x48, 48x64, 64x48, 80x32 and 96x32 pixels.
RULE = BucketRule(width=64, height=48)


def encode(clips):
    """A stand-in VAE of Wan's strides: 8x8 pixels and 4 frames (the first on its own) per latent cell."""
    x = clips[..., :3].permute(0, 4, 1, 2, 3).float()
    if x.shape[2] > 1:
        x = torch.cat([x[:, :, :1], F.avg_pool3d(x[:, :, 1:], (4, 1, 1))], 2)
    return F.avg_pool3d(x, (1, 8, 8)).repeat(1, 6, 1, 1, 1)[:, :16]


def _quiet(*_):
    pass


def _clip(frames, height, width, seed=0):
    return torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_bucket_sizes_are_on_the_grid_within_the_budget_and_take_the_nearest_aspect_ratio():
    rule = BucketRule(width=832, height=480)
    sizes = rule.sizes()
    assert (832, 480) in sizes and (480, 832) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 832 * 480 and 0.25 <= w / h <= 4
    for width, height in ((1920, 1080), (1080, 1920), (640, 640), (3000, 1000), (500, 700)):
        bucket = rule.bucket_for(width, height)
        gap = abs(math.log(bucket.width / bucket.height) - math.log(width / height))
        assert all(gap <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for w, h in sizes)
    assert rule.bucket_for(640, 640) == Bucket(624, 624)  # the largest square within 832x480 on the grid
    assert rule.bucket_for(1920, 1080) == Bucket(832, 480) and rule.bucket_for(1080, 1920) == Bucket(480, 832)
    assert BucketRule(832, 480, grid=32).bucket_for(1920, 1080).width % 32 == 0


def test_frame_counts_are_trimmed_to_what_the_vae_encodes_whole():
    assert [RULE.frames_for(n) for n in (5, 8, 9, 33, 50)] == [5, 5, 9, 33, 49]
    world_like = BucketRule(64, 48, frame_step=5, first_frame_alone=False)
    assert [world_like.frames_for(n) for n in (5, 12, 15)] == [5, 10, 15]
    with pytest.raises(InputError, match="frames"):
        RULE.frames_for(4)
    assert RULE.bucket_for(100, 40, frames=12) == Bucket(80, 32, 9)
    assert RULE.bucket_for(100, 40) == Bucket(80, 32, 1)  # a photo keeps its one frame


def test_a_clip_is_trimmed_never_padded_and_its_mask_flow_and_tokens_follow_it():
    clip = _clip(12, 40, 100)
    bucket = RULE.bucket_for(100, 40, 12)
    fitted = fit_clip(clip, bucket)
    assert fitted.shape == (9, 32, 80, 3)
    assert torch.equal(fitted[3], fit_image(clip[3], bucket))  # its first 9 frames, each fitted as a photo
    # A mask is cut where its photo is: a photo whose red channel is the mask keeps matching it.
    mask = torch.zeros(40, 100)
    mask[10:30, 5:25] = 1
    photo = torch.stack([mask, torch.zeros_like(mask), torch.zeros_like(mask)], -1)
    assert torch.allclose(fit_image(photo, bucket)[..., 0], fit_mask(mask, bucket), atol=1e-6)
    assert fit_mask(mask, bucket).amax() > 0.9
    # Flow: the kept frames' pairs, the vectors scaled as the clip is (40 -> 32 pixels high: 0.8).
    flow = torch.zeros(11, 2, 40, 100)
    flow[:, 0], flow[:, 1] = 2.0, 1.0
    fitted_flow = fit_flow(flow, bucket)
    crop = crop_for(40, 100, bucket)
    assert crop.scaled == (32, 80) and fitted_flow.shape == (8, 2, 32, 80)
    assert torch.allclose(fitted_flow[:, 0], torch.full_like(fitted_flow[:, 0], 2.0 * 80 / 100))
    assert torch.allclose(fitted_flow[:, 1], torch.full_like(fitted_flow[:, 1], 1.0 * 32 / 40))


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_dino_tokens_are_resampled_over_the_part_of_the_photo_the_bucket_keeps(fit):
    # A photo twice as wide as its square bucket keeps its middle half. Tokens hold their own place on the grid
    # (x, y as fractions); 'pad' put the photo in the middle half of the grid's rows, 'stretch' over all of it.
    size, bucket = (32, 64), Bucket(32, 32)
    centres = (torch.arange(8) + 0.5) / 8
    tokens = torch.stack([centres.view(1, 8).expand(8, 8), centres.view(8, 1).expand(8, 8)], -1)
    fitted = fit_patch_tokens(tokens, size, fit, bucket)
    assert fitted.shape == (8, 8, 2)
    inner = fitted[1:-1, 1:-1]  # away from the edges, where bilinear sampling clamps
    xs = 0.25 + 0.5 * centres[1:-1]
    ys = centres[1:-1] if fit == "stretch" else 0.25 + 0.5 * centres[1:-1]
    assert torch.allclose(inner[..., 0], xs.view(1, 6).expand(6, 6), atol=1e-5)
    assert torch.allclose(inner[..., 1], ys.view(6, 1).expand(6, 6), atol=1e-5)


def test_clips_of_mixed_sizes_and_lengths_make_one_set_per_bucket_with_their_flow():
    clips = [_clip(12, 40, 100, 0), _clip(9, 48, 64, 1), _clip(10, 80, 200, 2)]
    flows = [torch.randn(c.shape[0] - 1, 2, *c.shape[1:3]) for c in clips]
    context = torch.randn(3, 5, 64)
    data = clip_set(clips, encode, context, flows, stills=2, progress=_quiet, buckets=RULE)
    assert isinstance(data, Bucketed)
    assert data.labels == (Bucket(80, 32, 9), Bucket(64, 48, 9)) and data.counts == [2, 1]
    wide, square = data.sets
    assert wide.latents.shape == (2, 16, 3, 4, 10) and square.latents.shape == (1, 16, 3, 6, 8)
    assert wide.flow.shape == (2, 8, 2, 32, 80) and wide.stills.shape == (2, 2, 16, 1, 4, 10)
    assert torch.equal(wide.context, context[[0, 2]]) and torch.equal(square.context, context[[1]])
    assert torch.equal(wide.flow[1], fit_flow(flows[2], data.labels[0]))
    assert data.describe("clips") == ["80x32x9: 2 clips", "64x48x9: 1 clips"]
    with pytest.raises(InputError, match="different lengths or sizes"):
        clip_set(clips, encode, context, progress=_quiet)  # without buckets: refused, as before


def test_photos_of_mixed_sizes_bring_their_masks_tokens_and_moving_clips_into_their_bucket():
    photos = [_clip(1, 48, 64, 0)[0], _clip(1, 64, 48, 1)[0], _clip(1, 96, 128, 2)[0]]
    masks = []
    for p in photos:
        m = torch.zeros(p.shape[:2])
        m[p.shape[0] // 4:p.shape[0] * 3 // 4, p.shape[1] // 4:p.shape[1] * 3 // 4] = 1
        masks.append(m)
    tokens = torch.randn(3, 4, 4, 24)
    rep = SubjectRepresentation(tokens, torch.randn(3, 24), torch.randn(3, 24), torch.ones(3, 4, 4), "tiny", 56, 14,
                                "stretch", True)
    data = subject_set(photos, encode, torch.randn(1, 5, 64), masks, rep, moving_clips=1, moving_frames=5,
                       frame_step=4, progress=_quiet, buckets=RULE)
    assert data.labels == (Bucket(64, 48), Bucket(48, 64)) and data.counts == [2, 1]
    landscape, portrait = data.sets
    assert landscape.latents.shape == (2, 16, 1, 6, 8) and portrait.latents.shape == (1, 16, 1, 8, 6)
    assert landscape.masks.shape == (2, 1, 1, 6, 8) and landscape.moving.latents.shape == (2, 16, 2, 6, 8)
    assert landscape.dino_tokens.shape == (2, 24, 3, 5) and portrait.dino_tokens.shape == (1, 24, 5, 3)
    assert torch.equal(landscape.moving.photo, torch.tensor([0, 1]))  # the bucket's own photos
    # The big photo (its bucket's second) is the same picture scaled: its fitted mask is its latent mask's source.
    assert torch.equal(landscape.dino_tokens[1], fit_patch_tokens(tokens[2], (96, 128), "stretch",
                                                                  Bucket(64, 48)).permute(2, 0, 1))
    assert torch.allclose(landscape.latents[1], encode(fit_image(photos[2], Bucket(64, 48))[None, None])[0])


def test_joining_sets_puts_each_size_in_its_bucket_and_refuses_mixing_without_buckets():
    a = clip_set([_clip(9, 48, 64, 0)], encode, torch.randn(1, 5, 64), progress=_quiet, buckets=RULE)
    b = clip_set([_clip(9, 40, 100, 1)], encode, torch.randn(1, 5, 64), progress=_quiet, buckets=RULE)
    c = clip_set([_clip(9, 48, 64, 2)], encode, torch.randn(1, 5, 64), progress=_quiet, buckets=RULE)
    joined = append_clips(append_clips(a, b, bucketed=True), c, bucketed=True)
    assert joined.labels == (Bucket(64, 48, 9), Bucket(80, 32, 9)) and joined.counts == [2, 1]
    assert torch.equal(joined.sets[0].latents, torch.cat([a.sets[0].latents, c.sets[0].latents]))
    with pytest.raises(InputError, match="buckets"):
        append_clips(a, b)
    plain = [clip_set(_clip(9, 48, 64, i), encode, torch.randn(1, 5, 64), progress=_quiet) for i in range(2)]
    with pytest.raises(InputError, match="differ"):
        append_clips(plain[0], clip_set(_clip(9, 40, 96), encode, torch.randn(1, 5, 64), progress=_quiet))
    photos = [subject_set(_clip(1, h, w, 0), encode, torch.randn(1, 5, 64), progress=_quiet, buckets=RULE)
              for h, w in ((48, 64), (64, 48))]
    both = append_photos(photos[0], photos[1], bucketed=True)
    assert both.counts == [1, 1]
    with pytest.raises(InputError, match="sizes"):
        single_size(both, "subject")  # recipes that learn from one size refuse it, naming the buckets
    assert single_size(photos[0], "subject") is photos[0].sets[0]


def test_the_bucket_of_each_batch_is_drawn_by_the_run_generator_weighted_by_item_count():
    data = Bucketed((clip_set(torch.rand(1, 5, 16, 16, 3), encode, torch.randn(1, 5, 64), progress=_quiet),
                     clip_set(torch.rand(3, 5, 32, 16, 3), encode, torch.randn(1, 5, 64), progress=_quiet)),
                    (None, None))
    draws = [draw_bucket(data, torch.Generator().manual_seed(0)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same generator state, the same bucket
    g = torch.Generator().manual_seed(1)
    picks = [draw_bucket(data, g) for _ in range(4000)]
    assert abs(picks.count(1) / 4000 - 0.75) < 0.03
    one = Bucketed(data.sets[:1], (None,))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert draw_bucket(one, g) == 0 and torch.equal(g.get_state(), state)  # one bucket draws nothing


def _mixed_subject(seed=0):
    g = torch.Generator().manual_seed(seed)
    photos = [torch.rand(h, w, 3, generator=g) for h, w in ((48, 64), (48, 64), (64, 48), (96, 128))]
    masks = [torch.ones(p.shape[:2]) for p in photos]
    pres = clip_set([_clip(9, 48, 64, 5), _clip(5, 40, 100, 6)], encode, torch.randn(1, 5, 64, generator=g),
                    stills=2, progress=_quiet, buckets=RULE)
    return subject_set(photos, encode, torch.randn(1, 5, 64, generator=g), masks, preservation=pres,
                       progress=_quiet, buckets=RULE)


def _quick(settings, steps=6):
    return replace(settings, optim=OptimSettings(steps=steps, lr=1e-3, warmup=1, checkpoint_every=2),
                   projector_hidden=32)


def test_each_batch_comes_from_one_bucket(monkeypatch):
    backbone = describe(tiny_diffusers_wan())
    shapes = []
    forward = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda x, *a, **k: shapes.append(tuple(x.shape[2:])) or forward(x, *a, **k))
    data = _mixed_subject()
    train_subject(backbone, data, _quick(SubjectSettings(rank=4, batch=2, preservation_weight=1.0), steps=12))
    allowed = {tuple(s.latents.shape[2:]) for s in data.sets} | \
        {tuple(s.latents.shape[2:]) for s in data.sets[0].preservation.sets}
    assert set(shapes) <= allowed and len(set(shapes)) >= 3  # several buckets seen, every batch of one size
    clips = clip_set([_clip(9, 48, 64, 0), _clip(9, 40, 100, 1), _clip(5, 40, 100, 2)], encode,
                     torch.randn(1, 5, 64), stills=2, progress=_quiet, buckets=RULE)
    shapes.clear()
    train_motion(backbone, clips, _quick(MotionSettings(rank=4, spatial_rank=2, batch=2, alignment_weight=0), 12))
    assert len({s for s in shapes if s[0] > 1}) >= 2  # motion steps of both clip lengths/sizes


def test_a_set_of_one_size_trains_exactly_as_without_buckets():
    clip = _clip(9, 48, 64, 0)
    plain = clip_set(torch.stack([clip, _clip(9, 48, 64, 1)]), encode, torch.randn(1, 5, 64), progress=_quiet)
    one = clip_set([clip, _clip(9, 48, 64, 1)], encode, torch.randn(1, 5, 64), progress=_quiet, buckets=RULE)
    assert len(one.sets) == 1 and torch.equal(one.sets[0].latents, plain.latents)  # 64x48 is already a bucket
    settings = _quick(MotionSettings(rank=4, spatial_rank=2, alignment_weight=0))
    a = train_motion(describe(tiny_diffusers_wan()), plain, settings)
    b = train_motion(describe(tiny_diffusers_wan()), Bucketed((plain,), (None,)), settings)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_a_bucketed_run_resumes_bit_identically(tmp_path):
    data = _mixed_subject()
    settings = _quick(SubjectSettings(rank=4, batch=2), steps=6)
    full = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "a")

    class Interrupted(Exception):
        pass

    def stop_after_four(step, total, record):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "b", progress=stop_after_four)
    logs = []
    resumed = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "b", log=logs.append)
    assert logs == ["resumed from step 4 of 6"]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert all(torch.equal(v, resumed.tensors[k]) for k, v in full.tensors.items())
    rerun = train_subject(describe(tiny_diffusers_wan()), _mixed_subject(), settings)
    assert [r["loss"] for r in rerun.history] == [r["loss"] for r in full.history]  # reruns are identical
