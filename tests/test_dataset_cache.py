"""Datasets cached on disk: saved and loaded back equal (buckets, moving and preservation clips included), trained
from exactly as before, refused when made by another VAE or text encoder, when damaged, and written atomically."""

from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan
from test_buckets import RULE, _clip, _mixed_subject, _quiet, encode

from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.files import save_safetensors
from custvid_core.training import OptimSettings, SubjectSettings, train_subject
from custvid_core.training.dataset_cache import MadeBy, load_dataset, read_made_by, save_dataset
from custvid_core.training.datasets import Bucketed, MovingClips, SubjectSet, VideoSet, clip_set, subject_set

MADE_BY = MadeBy(vae="vae-print", text_encoder="text-print", vae_name="Wan 2.1 VAE", text_encoder_name="umt5-xxl")


def _equal(a, b):
    """Two sets hold the same tensors and fields, bucket by bucket."""
    assert type(a) is type(b)
    if isinstance(a, Bucketed):
        assert a.labels == b.labels
        for x, y in zip(a.sets, b.sets):
            _equal(x, y)
        return
    for name, x in vars(a).items():
        y = getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        elif isinstance(x, (VideoSet, SubjectSet, MovingClips, Bucketed)):
            _equal(x, y)
        else:
            assert x == y, name


def _subject_with_everything():
    photos = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 48, 64)
    masks[:, 12:36, 16:48] = 1
    pres = clip_set(_clip(9, 48, 64, 3), encode, torch.randn(1, 5, 64), torch.randn(8, 2, 48, 64), stills=2,
                    progress=_quiet)
    return subject_set(photos, encode, torch.randn(2, 5, 64), masks, preservation=pres, subject_tokens=(1, 2),
                       trigger_words="sks dog", moving_clips=1, moving_frames=5, frame_step=4, progress=_quiet)


@pytest.mark.parametrize("make", [_subject_with_everything, _mixed_subject,
                                  lambda: clip_set([_clip(9, 48, 64, 0), _clip(12, 40, 100, 1)], encode,
                                                   torch.randn(2, 5, 64), stills=2, progress=_quiet, buckets=RULE)])
def test_a_saved_dataset_loads_back_equal(tmp_path, make):
    data = make()
    path = save_dataset(tmp_path / "set.safetensors", data, MADE_BY)
    loaded = load_dataset(path, expect=MadeBy(vae="vae-print", text_encoder="text-print"))
    _equal(loaded, data)
    if isinstance(loaded, Bucketed) and loaded.sets[0].__class__ is SubjectSet:
        assert all(s.preservation is loaded.sets[0].preservation for s in loaded.sets)  # shared, stored once
    assert read_made_by(path) == MADE_BY


def test_training_from_a_loaded_cache_is_the_same_run(tmp_path):
    data = _mixed_subject()
    path = save_dataset(tmp_path / "set.safetensors", data, MADE_BY)
    settings = replace(SubjectSettings(rank=4, batch=2), projector_hidden=32,
                       optim=OptimSettings(steps=4, lr=1e-3, warmup=1))
    a = train_subject(describe(tiny_diffusers_wan()), data, settings)
    b = train_subject(describe(tiny_diffusers_wan()), load_dataset(path), settings)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_a_cache_of_another_vae_or_text_encoder_is_refused_naming_it(tmp_path):
    path = save_dataset(tmp_path / "set.safetensors", _subject_with_everything(), MADE_BY)
    with pytest.raises(InputError, match=r"another VAE \(Wan 2.1 VAE") as e:
        load_dataset(path, expect=MadeBy(vae="other", text_encoder="text-print"))
    assert e.value.input_name == "vae"
    with pytest.raises(InputError, match=r"another text encoder \(umt5-xxl") as e:
        load_dataset(path, expect=MadeBy(text_encoder="other"))
    assert e.value.input_name == "clip"
    load_dataset(path, expect=MadeBy(vae="vae-print"))  # only what is given is checked


def test_a_damaged_truncated_or_foreign_file_is_refused_with_its_name(tmp_path):
    path = save_dataset(tmp_path / "mine.safetensors", _subject_with_everything(), MADE_BY)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(InputError, match="mine.safetensors"):
        load_dataset(path)
    path.write_bytes(whole[:4] + b"\xff" * 8 + whole[12:])  # the header's length destroyed
    with pytest.raises(InputError, match="mine.safetensors"):
        load_dataset(path)
    lora = save_safetensors(tmp_path / "lora.safetensors", {"w": torch.zeros(2)}, {"kind": "lora"})
    with pytest.raises(InputError, match="lora.safetensors' is not a CustVid dataset cache"):
        load_dataset(lora)
    layout_broken = tmp_path / "broken.safetensors"
    save_safetensors(layout_broken, {"latents": torch.zeros(1)}, {"format": "custvid.dataset", "format_version": "1",
                                              "layout": {"kind": "clips", "latents": "latents", "context": "context",
                                                         "flow": None, "stills": None}})
    with pytest.raises(InputError, match="broken.safetensors' is damaged"):
        load_dataset(layout_broken)
    with pytest.raises(InputError, match="fingerprint"):
        save_dataset(tmp_path / "x.safetensors", _subject_with_everything(), MadeBy(vae="v"))


def test_a_failed_write_leaves_the_earlier_file_whole_and_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_dataset(tmp_path / "set.safetensors", _subject_with_everything(), MADE_BY)
    before = path.read_bytes()

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        save_dataset(path, _mixed_subject(), MADE_BY)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["set.safetensors"]
