"""Training sets built in the core: the shapes world's sets are the same tensors as before the builders
(the old formulas are written out here), and the builders' checks, joins and conversions."""

import pytest
import torch

from custvid_core.images import hue_rotations, moving_photos
from custvid_core.representations.motion import build_raft, compute_flow
from custvid_core.representations.subject import build_dinov2, extract_subject
from custvid_core.training import MovingClips, SubjectSet, VideoSet, append_clips, append_photos, clip_set, subject_set
from custvid_core.training.datasets import converted
from custvid_core.training.objectives import latent_mask
from custvid_core.world import customize
from custvid_core.world.cases import load_cases
from custvid_core.world.encoders import DINO_CONFIG
from custvid_core.world.latent import encode, encode_stills
from custvid_core.world.model import DEFAULT_CONFIG, build_world
from custvid_core.world.scene import random_scene, render

TINY = {**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64}


def _quiet(*_):
    pass


def _equal(a, b):
    """Two sets hold the same tensors (and the same moving and preservation clips)."""
    assert type(a) is type(b)
    for name, x in vars(a).items():
        y = getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and torch.equal(x, y), name
        elif isinstance(x, (VideoSet, SubjectSet, MovingClips)):
            _equal(x, y)
        else:
            assert x == y, name


def _old_vocabulary_clips(text, spec, count, seed):
    g = torch.Generator().manual_seed(seed)
    rendered = [render(random_scene(g, spec), spec) for _ in range(count)]
    frames = torch.stack([c.frames for c in rendered])
    with torch.no_grad():
        context = text([c.prompt for c in rendered])
    return VideoSet(encode(frames), context, stills=torch.stack([encode_stills(f) for f in frames]))


def test_the_worlds_subject_set_is_what_the_old_formulas_made():
    world = build_world(TINY)
    case = load_cases()[0]
    torch.manual_seed(0)
    dino = build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny")
    seed, preservation, per_photo = 3, 2, 2
    built = customize.subject_set(world, case, dino, preservation=preservation, seed=seed, moving_clips=per_photo)

    photos = case.subject_images()
    frames = torch.cat([p.frames for p in photos])
    pixel_masks = torch.cat([p.masks for p in photos])
    latents = encode_stills(frames)
    masks = latent_mask(pixel_masks[:, None], latents.shape)
    with torch.no_grad():
        context = world.text(["sks"])
    spec = case.spec
    travel = tuple(v * (spec.frames - 1) / spec.size for v in spec.speed)
    clips, clip_masks = moving_photos(list(frames), list(pixel_masks), per_photo, spec.frames, travel, seed)
    moving_latents = encode(clips)
    rep = extract_subject(dino, frames, pixel_masks, resolution=spec.size, fit="stretch", progress=_quiet)
    old = SubjectSet(latents, context, masks, rep.patch_tokens.permute(0, 3, 1, 2).contiguous(),
                     _old_vocabulary_clips(world.text, spec, preservation, seed + 4242), subject_tokens=(0,),
                     trigger_words="sks", moving=MovingClips(moving_latents, context,
                                                             latent_mask(clip_masks, moving_latents.shape),
                                                             torch.arange(len(frames)).repeat_interleave(per_photo)))
    _equal(built, old)


def test_the_worlds_motion_set_is_what_the_old_formulas_made():
    world = build_world(TINY)
    case = load_cases()[0]
    raft = build_raft("raft_small")
    hue_copies = 2
    built = customize.motion_set(world, case, raft, hue_copies)

    clips = case.motion_clips()
    versions = [(c, frames) for c in clips for frames in hue_rotations(c.frames, hue_copies)]
    with torch.no_grad():
        context = world.text([f"{c.prompt} mtn" for c, _ in versions])
    flows = [compute_flow(raft, c.frames, progress=_quiet) for c in clips]
    flow = torch.stack([f for f in flows for _ in range(hue_copies + 1)])
    stills = torch.stack([encode_stills(f) for _, f in versions])
    _equal(built, VideoSet(encode(torch.stack([f for _, f in versions])), context, flow, stills))
    _equal(customize.motion_set(world, case), VideoSet(encode(torch.stack([c.frames for c in clips])),
                                                       context[::hue_copies + 1], None, stills[::hue_copies + 1]))


def _vae_encode(pixels):
    """A stand-in VAE encode: 4 frames (the first alone) -> 1 + F // 4 latent frames, 2x2 pixels per cell."""
    first, rest = pixels[:, :1], pixels[:, 1:]
    frames = [first] + ([rest.unflatten(1, (-1, 4)).mean(2)] if rest.shape[1] else [])
    x = torch.cat(frames, 1).permute(0, 4, 1, 2, 3)  # [N, 3, T, H, W]
    return torch.nn.functional.avg_pool3d(x, (1, 2, 2)).repeat(1, 2, 1, 1, 1)[:, :4]


def _photos(n=3, size=16):
    g = torch.Generator().manual_seed(0)
    photos = torch.rand(n, size, size, 3, generator=g) * 0.2
    masks = torch.zeros(n, size, size)
    masks[:, 5:10, 4:9] = 1
    photos[masks > 0] = torch.tensor([1.0, 0.5, 0.0])
    return photos, masks


def test_a_subject_set_with_moving_clips_and_a_clip_set_with_stills_and_hue_copies():
    photos, masks = _photos()
    context = torch.randn(1, 5, 8)
    calls = []
    subject = subject_set(photos, _vae_encode, context, masks, moving_clips=2, moving_frames=9, frame_step=4,
                          progress=lambda done, total: calls.append((done, total)))
    assert subject.latents.shape == (3, 4, 1, 8, 8) and subject.masks.shape == (3, 1, 1, 8, 8)
    assert isinstance(subject.moving, MovingClips)
    assert subject.moving.latents.shape == (6, 4, 3, 8, 8) and subject.moving.masks.shape == (6, 1, 3, 8, 8)
    assert calls == [(i, 9) for i in range(1, 10)]  # 3 photos, 6 clips, one at a time
    with pytest.raises(ValueError, match="moving_frames: 7 frames"):
        subject_set(photos, _vae_encode, context, masks, moving_clips=1, moving_frames=7, frame_step=4, progress=_quiet)
    with pytest.raises(ValueError, match="moving_clips: the subject is cut out by its mask"):
        subject_set(photos, _vae_encode, context, moving_clips=1, progress=_quiet)
    with pytest.raises(ValueError, match="images: photos of different sizes"):
        subject_set([photos[0], photos[1, :8]], _vae_encode, context, progress=_quiet)

    clip = torch.rand(9, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    flow = torch.randn(8, 2, 16, 16)
    clips = clip_set(clip, _vae_encode, context, flow, stills=3, hue_copies=2, progress=_quiet)
    assert clips.latents.shape == (3, 4, 3, 8, 8) and clips.stills.shape == (3, 3, 4, 1, 8, 8)
    assert clips.flow.shape == (3, 8, 2, 16, 16) and torch.equal(clips.flow[2], flow)
    # The stills are the first, middle and last frames, encoded as images; a hue copy is another clip.
    assert torch.equal(clips.stills[0, 1], _vae_encode(clip[None, 4:5])[0])
    assert not torch.equal(clips.latents[1], clips.latents[0])
    with pytest.raises(ValueError, match="motion_representation: flow of 1 clips of 5 frames"):
        clip_set(clip, _vae_encode, context, flow[:4], progress=_quiet)
    with pytest.raises(ValueError, match="frames: a clip of shape"):
        clip_set(clip[:1], _vae_encode, context, progress=_quiet)


def test_sets_join_and_convert_with_their_moving_and_preservation_clips():
    photos, masks = _photos()
    context = torch.randn(1, 5, 8)
    clips = clip_set(torch.rand(2, 5, 16, 16, 3), _vae_encode, torch.randn(2, 5, 8), progress=_quiet)
    both = append_clips(clips, clips)
    assert both.latents.shape[0] == both.context.shape[0] == both.stills.shape[0] == 4
    with pytest.raises(ValueError, match="frames: latents"):
        append_clips(clips, clip_set(torch.rand(1, 9, 16, 16, 3), _vae_encode, context, progress=_quiet))
    one = subject_set(photos[:1], _vae_encode, context, masks[:1], preservation=clips, moving_clips=1,
                      moving_frames=5, progress=_quiet)
    more = subject_set(photos[1:], _vae_encode, context, masks[1:], moving_clips=1, moving_frames=5, progress=_quiet)
    joined = append_photos(one, more)
    assert joined.latents.shape[0] == 3 and joined.moving.latents.shape[0] == 3 and joined.preservation is clips
    assert torch.equal(joined.moving.masks[1:], more.moving.masks)
    with pytest.raises(ValueError, match="masks: given for some photos and not others"):
        append_photos(one, subject_set(photos[1:], _vae_encode, context, progress=_quiet))
    doubled = converted(joined, lambda x: 2 * x)
    assert torch.equal(doubled.moving.latents, 2 * joined.moving.latents)
    assert torch.equal(doubled.preservation.stills, 2 * clips.stills) and torch.equal(doubled.masks, joined.masks)


def test_moving_clips_know_their_photo_and_its_prompt_across_joins():
    photos, masks = _photos()
    prompts = torch.arange(3.0)[:, None, None].expand(3, 5, 8)  # one prompt per photo, its index as its value
    subject = subject_set(photos, _vae_encode, prompts, masks, moving_clips=2, moving_frames=5, progress=_quiet)
    assert subject.moving.photo.tolist() == [0, 0, 1, 1, 2, 2]
    assert subject.moving.context[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    still = subject_set(photos[:1], _vae_encode, prompts[:1], masks[:1], progress=_quiet)
    moving = subject_set(photos[1:], _vae_encode, prompts[1:], masks[1:], moving_clips=1, moving_frames=5,
                         progress=_quiet)
    joined = append_photos(append_photos(still, moving), moving)  # photos 1, 2 and again 3, 4 have moving clips
    assert joined.moving.photo.tolist() == [1, 2, 3, 4]
    assert torch.equal(joined.moving.context[:, 0, 0], joined.context[joined.moving.photo, 0, 0])
    assert converted(joined, lambda x: 2 * x).moving.photo.tolist() == [1, 2, 3, 4]


def test_moving_clips_are_validated_like_the_photos():
    latents = torch.randn(2, 4, 2, 8, 8)
    masks = torch.ones(2, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="masks: mask 1 is empty"):
        MovingClips(latents, torch.randn(1, 5, 8), torch.cat([masks[:1], torch.zeros_like(masks[:1])]))
    with pytest.raises(ValueError, match="masks: 1 masks of grid"):
        MovingClips(latents, torch.randn(1, 5, 8), masks[:1])
    with pytest.raises(ValueError, match="moving_clips: their conditioning has another shape"):
        SubjectSet(torch.randn(1, 4, 1, 8, 8), torch.randn(1, 5, 8),
                   moving=MovingClips(latents, torch.randn(1, 6, 8), masks))


def test_the_readme_example_builds_sets_from_image_files_and_trains(tmp_path, monkeypatch):
    """The README's "Use the library without ComfyUI" snippet, run as written (but 2 steps) on the shapes world,
    whose VAE encodes a photo as a still clip."""
    import re
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from custvid_core.adapters import read_lora
    from custvid_core.world.scene import Scene, WorldSpec

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Use the library without ComfyUI"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "steps=300" in snippet
    snippet = snippet.replace("steps=300", "steps=2")

    def save(image, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(path)

    for i in range(2):
        photo = render(Scene(colour="orange", shape="star", start=(10 + 4 * i, 16)), WorldSpec(frames=1))
        save(photo.frames[0], tmp_path / "my_subject" / f"{i}.png")
        save(photo.masks[0], tmp_path / "my_subject" / "masks" / f"{i}.png")
    for i, frame in enumerate(render(Scene(colour="red", shape="circle"), WorldSpec(frames=10)).frames):
        save(frame, tmp_path / "my_motion" / f"{i:02}.png")
    monkeypatch.chdir(tmp_path)
    world = build_world(TINY)

    def vae_encode(clip):
        return encode_stills(clip) if clip.shape[0] == 1 else encode(clip)

    namespace = {"transformer": world.backbone.model, "vae_encode": vae_encode, "text": world.text}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["subject"].latents.shape == (2, 16, 1, 32, 32) and namespace["motion"].latents.shape[0] == 4
    assert namespace["motion"].stills.shape[:2] == (4, 8)
    for name, words in (("my_subject", "sks star"), ("my_motion", "mtn")):
        _, spec, meta = read_lora(tmp_path / f"{name}.safetensors")
        assert spec is not None and meta["custvid.lora.info"]["trigger_words"] == words
        assert meta["custvid.lora.base_model"]["blocks"] == 2
