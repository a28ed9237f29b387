"""Image-to-video training on size buckets: each bucket carries its items' start images (the fitted item's first
frame) and CLIP features, every batch passes its own bucket's to the model, joined sets keep them, and the dataset
cache stores and restores them (older caches, without them, still load)."""

import json
from dataclasses import replace

import pytest
import torch
from test_buckets import RULE, _clip, _quiet, encode
from test_dataset_cache import MADE_BY, _equal
from test_i2v import context, features, spy, tiny_i2v_wan

from custvid_core.errors import InputError
from custvid_core.files import load_safetensors, save_safetensors
from custvid_core.training import MotionSettings, OptimSettings, SubjectSettings, distributed, train_motion, train_subject
from custvid_core.training.buckets import Bucket, fit_clip
from custvid_core.training.dataset_cache import load_dataset, save_dataset
from custvid_core.training.datasets import (
    Bucketed,
    SubjectSet,
    append_clips,
    append_photos,
    clip_set,
    start_image_video,
    subject_set,
)


def _quick(settings, steps):
    return replace(settings, optim=OptimSettings(steps=steps, lr=1e-3, warmup=1, checkpoint_every=100))


def _mixed_clips(features_of=None, seed=0):
    """Clips of three sizes and two lengths: buckets 64x48x9 (two clips), 80x32x9 and 80x32x5."""
    clips = [_clip(9, 48, 64, seed), _clip(12, 40, 100, seed + 1), _clip(5, 80, 200, seed + 2),
             _clip(9, 96, 128, seed + 3)]
    return clips, clip_set(clips, encode, context(), stills=2, progress=_quiet, buckets=RULE, start_images=True,
                           clip_features=features_of)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b)


def _row(t: torch.Tensor, rows: torch.Tensor) -> int:
    """The one row of `rows` equal to `t`."""
    (found,) = [j for j in range(rows.shape[0]) if _same(t, rows[j])]
    return found


def test_each_bucket_carries_its_fitted_items_start_images_and_features():
    feats = features(4)
    clips, data = _mixed_clips(feats)
    assert data.labels == (Bucket(64, 48, 9), Bucket(80, 32, 9), Bucket(80, 32, 5)) and data.counts == [2, 1, 1]
    for items, label, s in zip(([0, 3], [1], [2]), data.labels, data.sets):
        assert s.start.shape == s.latents.shape
        for j, i in enumerate(items):  # the start image is the clip's first frame, fitted as the clip is
            first = fit_clip(clips[i], label)[0]
            assert torch.allclose(s.start[j], encode(start_image_video(first, label.frames)[None])[0])
        assert torch.equal(s.clip_features, feats[items])
        assert torch.allclose(s.start[:, :, 0], s.latents[:, :, 0])  # the same first frame as its clip


@pytest.fixture(params=[(0, 1), (1, 2)], ids=["alone", "second_of_two_processes"])
def share(request):
    """This process's share of each batch (`distributed.own_rows`): all of it, or the second half of two."""
    token = distributed._SHARE.set(request.param)
    yield request.param
    distributed._SHARE.reset(token)


def test_motion_training_on_buckets_passes_each_batch_its_buckets_start_images_and_features(share):
    _, data = _mixed_clips(features(4))
    backbone = tiny_i2v_wan()
    seen = spy(backbone)
    train_motion(backbone, data, _quick(MotionSettings(rank=2, spatial_rank=2, batch=2, alignment_weight=0.0), 16))
    motion_shapes = set()
    for x, image in seen:
        start, feats = image.latents[:, 4:], image.clip_features
        assert start.shape == x.shape and x.shape[0] == 2 // share[1] and feats.shape[0] == x.shape[0]
        if x.shape[2] == 1:  # a still of the spatial phase is its own start image, with its clip's features
            (s,) = [s for s in data.sets if any(_same(start[0], t) for t in s.stills.flatten(0, 1))]
            for r in range(x.shape[0]):
                j = [j for j in range(s.stills.shape[0]) if any(_same(start[r], t) for t in s.stills[j])][0]
                assert torch.equal(feats[r], s.clip_features[j])
            continue
        (s,) = [s for s in data.sets if s.latents.shape[2:] == x.shape[2:]]  # the batch's bucket
        motion_shapes.add(tuple(x.shape[2:]))
        for r in range(x.shape[0]):
            j = _row(start[r], s.start)
            assert torch.equal(feats[r], s.clip_features[j])
    assert len(motion_shapes) >= 2  # motion steps from several buckets


def _centre_mask(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[h // 4:h * 3 // 4, w // 4:w * 3 // 4] = 1
    return m


def _mixed_photos(with_features: bool, seed=0):
    """Photos of two sizes with masks, moving clips and bucketed preservation clips of 9 frames, for an I2V model."""
    g = torch.Generator().manual_seed(seed)
    photos = [torch.rand(h, w, 3, generator=g) for h, w in ((48, 64), (64, 48), (96, 128))]
    masks = [_centre_mask(*p.shape[:2]) for p in photos]
    pres = clip_set([_clip(9, 48, 64, 5), _clip(9, 40, 100, 6)], encode, context(), stills=2, progress=_quiet,
                    buckets=RULE, start_images=True, clip_features=features(2) if with_features else None)
    return subject_set(photos, encode, context(), masks, preservation=pres, moving_clips=1, moving_frames=5,
                       frame_step=4, progress=_quiet, buckets=RULE, start_images=True,
                       clip_features=features(3) if with_features else None)


def test_subject_training_on_buckets_passes_photos_moving_and_preservation_clips_their_own_start_images(share):
    data = _mixed_photos(with_features=True)
    assert data.labels == (Bucket(64, 48), Bucket(48, 64)) and data.counts == [2, 1]
    feats = features(3)
    for s, items in zip(data.sets, ([0, 2], [1])):
        assert s.start is s.latents and torch.equal(s.clip_features, feats[items])
        assert torch.equal(s.moving.clip_features, s.clip_features[s.moving.photo])  # a clip's are its photo's
        assert torch.allclose(s.moving.start[:, :, 0], s.moving.latents[:, :, 0])
    backbone = tiny_i2v_wan()
    seen = spy(backbone)
    train_subject(backbone, data, _quick(SubjectSettings(rank=2, batch=2, alignment_weight=0.0, token_attention_weight=0.0,
                                                         moving_share=0.5, preservation_weight=1.0, stillness_rank=2), 24))
    # Every start image the model may be given, with its CLIP features: the photos', the moving clips', the
    # preservation clips' and (a still is its own start image) their stills', each with its own item's features.
    known = [(s.start[j], s.clip_features[j]) for s in data.sets for j in range(len(s.start))]
    known += [(s.moving.start[j], s.moving.clip_features[j]) for s in data.sets for j in range(len(s.moving.start))]
    still_starts = [(c.stills[j, k], c.clip_features[j]) for c in data.preservation.sets for j in range(len(c.start))
                    for k in range(c.stills.shape[1])]
    known += [(c.start[j], c.clip_features[j]) for c in data.preservation.sets for j in range(len(c.start))] + still_starts
    lengths, stills_seen = set(), 0
    for x, image in seen:
        start, feats = image.latents[:, 4:], image.clip_features
        assert start.shape == x.shape and x.shape[0] == 2 // share[1] and feats.shape[0] == x.shape[0]
        lengths.add(x.shape[2])  # 1: photos and stills, 2: moving clips, 3: preservation clips
        for r in range(x.shape[0]):
            matches = [f for t, f in known if _same(start[r], t)]
            assert matches and all(torch.equal(feats[r], f) for f in matches)
            stills_seen += any(_same(start[r], t) for t, _ in still_starts)
    assert lengths == {1, 2, 3} and stills_seen > 0


def test_an_i2v_model_refuses_a_bucketed_set_without_start_images_or_features():
    plain = clip_set([_clip(9, 48, 64, 0), _clip(9, 40, 100, 1)], encode, context(), stills=0, progress=_quiet,
                     buckets=RULE)
    settings = _quick(MotionSettings(rank=2, spatial_rank=0, alignment_weight=0.0), 1)
    with pytest.raises(InputError, match="start images"):
        train_motion(tiny_i2v_wan(), plain, settings)
    _, no_features = _mixed_clips(None)
    with pytest.raises(InputError, match="CLIP vision features"):
        train_motion(tiny_i2v_wan(), no_features, settings)


def test_joining_bucketed_sets_keeps_start_images_and_features_and_refuses_mixing_with_plain_ones():
    fa, fb = features(4), features(1) + 1
    _, a = _mixed_clips(fa)
    b = clip_set([_clip(9, 48, 64, 9), _clip(9, 64, 48, 10)], encode, context(), stills=2, progress=_quiet,
                 buckets=RULE, start_images=True, clip_features=fb)
    joined = append_clips(a, b, bucketed=True)
    assert joined.labels == (*a.labels, Bucket(48, 64, 9)) and joined.counts == [3, 1, 1, 1]
    same = joined.sets[0]  # a's 64x48 bucket with b's 64x48 clip after its two
    assert torch.equal(same.start, torch.cat([a.sets[0].start, b.sets[0].start]))
    assert torch.equal(same.clip_features, torch.cat([fa[[0, 3]], fb]))
    assert torch.equal(joined.sets[3].start, b.sets[1].start) and torch.equal(joined.sets[3].clip_features, fb)
    t2v_same = clip_set([_clip(9, 48, 64, 11)], encode, context(), stills=2, progress=_quiet, buckets=RULE)
    t2v_new = clip_set([_clip(9, 64, 48, 12)], encode, context(), stills=2, progress=_quiet, buckets=RULE)
    for other in (t2v_same, t2v_new):  # into an existing bucket, or as a bucket of its own
        with pytest.raises(InputError) as e:
            append_clips(a, other, bucketed=True)
        assert e.value.input_name == "image_to_video"
    photos = _mixed_photos(with_features=False)
    more = subject_set([torch.rand(64, 48, 3), torch.rand(32, 96, 3)], encode, context(),
                       [_centre_mask(64, 48), _centre_mask(32, 96)], moving_clips=1, moving_frames=5, frame_step=4,
                       progress=_quiet, buckets=RULE, start_images=True)
    both = append_photos(photos, more, bucketed=True)
    assert both.counts == [2, 2, 1]
    assert all(s.start.shape == s.latents.shape and s.moving.start.shape == s.moving.latents.shape for s in both.sets)
    assert torch.equal(both.sets[1].start, torch.cat([photos.sets[1].latents, more.sets[0].latents]))
    assert torch.equal(both.sets[1].moving.start, torch.cat([photos.sets[1].moving.start, more.sets[0].moving.start]))


@pytest.mark.parametrize("make", [lambda: _mixed_clips(features(4))[1], lambda: _mixed_photos(with_features=True),
                                  lambda: _mixed_photos(with_features=False)])
def test_the_cache_stores_and_restores_start_images_and_features(tmp_path, make):
    data = make()
    loaded = load_dataset(save_dataset(tmp_path / "i2v.safetensors", data, MADE_BY))
    _equal(loaded, data)
    assert all(s.start is not None for s in loaded.sets)
    if isinstance(loaded.sets[0], SubjectSet):  # moving and preservation clips keep theirs too
        assert all(s.moving.start is not None for s in loaded.sets)
        assert all(s.start is not None for s in loaded.preservation.sets)


def test_a_version_1_cache_without_start_images_still_loads_and_a_newer_one_is_refused(tmp_path):
    data = clip_set([_clip(9, 48, 64, 0), _clip(12, 40, 100, 1)], encode, context(), stills=2, progress=_quiet,
                    buckets=RULE)
    path = save_dataset(tmp_path / "set.safetensors", data, MADE_BY)
    tensors, meta = load_safetensors(path, "file")
    layout = json.loads(meta["layout"])
    for s in layout["sets"]:  # version 1 layouts have no start images or CLIP features
        del s["start"], s["clip_features"]
    old = tmp_path / "v1.safetensors"
    save_safetensors(old, tensors, {**meta, "format_version": "1", "layout": layout})
    loaded = load_dataset(old)
    assert isinstance(loaded, Bucketed) and all(s.start is None and s.clip_features is None for s in loaded.sets)
    _equal(loaded, data)
    newer = tmp_path / "v9.safetensors"
    save_safetensors(newer, tensors, {**meta, "format_version": "9"})
    with pytest.raises(InputError, match="format 9"):
        load_dataset(newer)
