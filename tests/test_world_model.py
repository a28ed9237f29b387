"""The world's latent map, text encoder, base model file and sampler."""

import dataclasses

import pytest
import torch

from custvid_core.backbones.wan import diffusers_to_native_key
from custvid_core.errors import InputError
from custvid_core.files import load_safetensors
from custvid_core.world import latent
from custvid_core.world.evaluate import evaluate_vocabulary, vocabulary_prompts
from custvid_core.world.model import DEFAULT_CONFIG, MODEL_FILE, TEXT_FILE, build_world, load_world, save_world, text_file_for
from custvid_core.world.sample import flow_sigmas, generate, sample_flow
from custvid_core.world.scene import SEEN_SHAPES, Scene, render
from custvid_core.world.text import PLACEHOLDERS, WorldTextEncoder

TINY = {**DEFAULT_CONFIG, "num_layers": 1, "ffn_dim": 64}


def test_latent_map_is_exactly_invertible_in_wans_layout():
    frames = render(Scene()).frames
    z = latent.encode(frames)
    assert z.shape == (1, 16, 1, 32, 32)  # the whole 5-frame clip in one latent frame
    assert torch.equal(z[:, 15:], torch.zeros_like(z[:, 15:]))
    assert torch.allclose(latent.decode(z)[0], frames, atol=1e-6)
    # One pixel of frame 7 (of 10) lands at its own position, in latent frame 1, in sub-frame 2's channels.
    one = torch.zeros(10, 4, 4, 3)
    one[7, 2, 3] = 1.0
    hot = (latent.encode(one)[0, :15] != -1).nonzero().tolist()
    assert hot == [[6, 1, 2, 3], [7, 1, 2, 3], [8, 1, 2, 3]]
    stills = latent.encode_stills(frames[:2])
    assert stills.shape == (2, 16, 1, 32, 32)
    assert torch.allclose(latent.decode(stills)[1], frames[1:2].expand(5, -1, -1, -1), atol=1e-6)
    with pytest.raises(InputError, match="frames: 6 frames"):
        latent.encode(torch.zeros(6, 4, 4, 3))


def test_text_encoder_pads_with_zeros_and_names_unknown_words():
    enc = WorldTextEncoder()
    ctx = enc(["red striped circle moving left", ""])
    assert ctx.shape == (2, 16, 4096)
    assert ctx[0, :5].abs().sum(1).min() > 0 and ctx[0, 5:].abs().sum() == 0
    assert ctx[1].abs().sum() == 0
    # Word order carries nothing (Wan's text side has no positions): a bag of words.
    assert torch.allclose(enc("moving left red circle")[0, :4].sum(0), enc("red circle moving left")[0, :4].sum(0), atol=1e-5)
    assert all(p in enc.vocabulary for p in PLACEHOLDERS)
    with pytest.raises(InputError, match="prompt: 'dragon' is not a word of the shapes world"):
        enc("red dragon")


def test_world_file_has_native_wan21_keys_and_loads_back(tmp_path):
    world = build_world(TINY, seed=3)
    world.info = {"command": "test", "seed": 3}
    save_world(world, tmp_path / "m.safetensors", tmp_path / "t.safetensors")
    tensors, meta = load_safetensors(tmp_path / "m.safetensors")
    native = {diffusers_to_native_key(k) for k in world.backbone.model.state_dict()}
    assert set(tensors) == native
    # What ComfyUI's detection reads: head.modulation (Wan 2.1), 16 input channels, dim % 128 == 0.
    assert tensors["head.modulation"].shape[-1] % 128 == 0
    assert tensors["patch_embedding.weight"].shape[1] == 16
    assert tensors["text_embedding.0.weight"].shape[1] == 4096
    back = load_world(tmp_path / "m.safetensors", tmp_path / "t.safetensors")
    x, ctx = torch.randn(1, 16, 2, 4, 4), world.text("blue square")
    with torch.no_grad():
        assert torch.allclose(back.backbone.forward(x, 0.5, ctx), world.backbone.forward(x, 0.5, ctx), atol=1e-6)
    assert torch.equal(back.text.embedding.weight, world.text.embedding.weight)
    assert back.info == {"command": "test", "seed": 3}
    with pytest.raises(InputError, match="world_model: 't.safetensors' is not a shapes-world model"):
        load_world(tmp_path / "t.safetensors", tmp_path / "t.safetensors")


def test_flow_schedule_and_euler_sampler_on_a_known_field():
    sigmas = flow_sigmas(10, shift=3.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    assert float(sigmas[5]) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))

    class Exact:
        """v = noise - x0 for data that is always `target`: Euler must land exactly on target."""

        def __init__(self, target):
            self.target = target

        def forward(self, x, sigma, context):
            noise = (x - (1 - sigma) * self.target) / sigma
            return noise - self.target

    target = torch.randn(1, 16, 2, 4, 4)
    out = sample_flow(Exact(target), torch.zeros(1, 1, 1), None, torch.randn_like(target), steps=7,
                      progress=lambda *_: None)
    assert torch.allclose(out, target, atol=1e-5)


def test_generate_returns_clips_of_the_world_geometry():
    world = build_world(TINY)
    clips = generate(world, ["red circle moving left", "blue square"], seed=0, steps=2, progress=lambda *_: None)
    assert clips.shape == (2, 5, 32, 32, 3) and clips.min() >= 0 and clips.max() <= 1
    again = generate(world, ["red circle moving left", "blue square"], seed=0, steps=2, progress=lambda *_: None)
    assert torch.equal(clips, again)


def test_training_noise_levels_follow_the_chosen_distribution():
    """Shifted sampling puts training where the sampler's shift-3 schedule spends its steps: median sigma
    3 * 0.5 / (1 + 2 * 0.5) = 0.75, a quarter of the draws above 0.9; logit-normal(0, 1) has median 0.5."""
    from custvid_core.world.sample import flow_sigmas
    from custvid_core.world.train import TrainConfig, sigma_sampler

    g = torch.Generator().manual_seed(0)
    shifted = sigma_sampler(TrainConfig(sigma_sampling="shifted"))(20000, g)
    assert abs(shifted.median().item() - 0.75) < 0.01 and abs((shifted > 0.9).float().mean().item() - 0.25) < 0.01
    assert abs((flow_sigmas(20, 3.0)[:-1] > 0.9).float().mean().item() - 0.25) < 0.06  # the sampler's share
    logit = sigma_sampler(TrainConfig())(20000, g)
    assert abs(logit.median().item() - 0.5) < 0.01 and (logit > 0.9).float().mean().item() < 0.06


def test_world_training_writes_a_loadable_model_of_the_chosen_width_and_resumes(tmp_path):
    from custvid_core.world.model import load_world
    from custvid_core.world.train import TrainConfig, train_world

    cfg = TrainConfig(steps=2, batch=2, pool=4, refresh=1, layers=1, ffn=64, heads=2, warmup=1, checkpoint_every=1,
                      sigma_sampling="shifted", centred_jitter=2.0)
    logs = []
    train_world(tmp_path, cfg, command="test", log=logs.append)
    world = load_world(tmp_path / "custvid_shapes_world_wan21.safetensors",
                       tmp_path / "custvid_shapes_world_text.safetensors")
    assert world.backbone.dim == 256 and world.info["train_config"]["heads"] == 2
    train_world(tmp_path, dataclasses.replace(cfg, steps=3), command="test", log=logs.append)
    assert "resumed from step 2" in logs


def test_a_world_models_text_encoder_is_found_beside_it_or_in_the_shipped_layout(tmp_path):
    assert text_file_for(MODEL_FILE) == TEXT_FILE  # diffusion_models/ and text_encoders/, as shipped
    (tmp_path / "custvid_shapes_world_text.safetensors").write_bytes(b"")
    assert text_file_for(tmp_path / "custvid_shapes_world_wan21.safetensors") == \
        tmp_path / "custvid_shapes_world_text.safetensors"  # a world-train output folder
    assert text_file_for(tmp_path / "models" / "custvid_shapes_world_pans_wan21.safetensors").name == \
        "custvid_shapes_world_pans_text.safetensors"


@pytest.mark.parametrize("sizes", [("19", "16"), ("0", "12"), ("16", "40")])
def test_world_train_refuses_object_sizes_that_do_not_fit_the_frame(tmp_path, capsys, sizes):
    from custvid_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["world-train", "--out", str(tmp_path / "run"), "--steps", "1", "--object-size", *sizes])
    assert exit_.value.code == 2 and "error: object-size:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_vocabulary_scores_count_every_clip_once():
    scores = evaluate_vocabulary(build_world(TINY, seed=1), prompts=6, seeds=(0,), steps=2, batch=3)
    assert scores.samples == 6 and set(scores.shape_confusion) == set(SEEN_SHAPES)
    prompted = [s.shape for s in vocabulary_prompts(6)]
    assert {s: sum(c.values()) for s, c in scores.shape_confusion.items()} == {s: prompted.count(s) for s in SEEN_SHAPES}
    right = sum(c.get(s, 0) for s, c in scores.shape_confusion.items())
    assert scores.shape == right / 6
