"""Customization on the shapes world: cached sets from a case, the LoRA ladder end to end (tiny runs)."""

from dataclasses import replace

import pytest
import torch

from custvid_core.adapters import read_lora
from custvid_core.adapters.embedding import load_trigger_embedding
from custvid_core.adapters.parts import Exported
from custvid_core.control import SMRABOOTH_TIMING, StrengthSchedule
from custvid_core.errors import InputError
from custvid_core.representations.motion import build_raft
from custvid_core.representations.subject import build_dinov2
from custvid_core.training import TrainedParts
from custvid_core.world.bench.methods import lora_methods
from custvid_core.world.cases import DEFAULT_CASES, load_cases
from custvid_core.world.customize import generate_with_loras, motion_set, subject_set
from custvid_core.world.encoders import DINO_CONFIG
from custvid_core.world.model import DEFAULT_CONFIG, build_world
from custvid_core.world.sample import generate

TINY = {**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64}


def test_case_sets_hold_masks_representations_and_captions():
    world = build_world(TINY)
    case = load_cases()[0]
    torch.manual_seed(0)
    dino = build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny")
    subject = subject_set(world, case, dino, preservation=3)
    n = len(case.subject_images())
    assert subject.latents.shape == (n, 16, 1, 32, 32) and subject.masks.shape == (n, 1, 1, 32, 32)
    # The mask covers the subject's pixels and nothing else in the latent's first channel.
    photo = case.subject_images()[0]
    assert torch.equal(subject.masks[0, 0, 0].bool(), photo.masks[0].bool())
    assert subject.dino_tokens.shape == (n, DINO_CONFIG["hidden_size"], 8, 8)
    assert subject.preservation.latents.shape == (3, 16, 1, 32, 32)
    raft = build_raft("raft_small")
    motion = motion_set(world, case, raft)
    assert motion.latents.shape[1:] == (16, 1, 32, 32) and motion.flow.shape[1:] == (4, 2, 32, 32)
    assert motion.stills.shape[1:] == (5, 16, 1, 32, 32)
    # Each clip is captioned with its own subject plus the motion placeholder.
    expected = world.text([f"{c.prompt} mtn" for c in case.motion_clips()])
    assert torch.equal(motion.context, expected)


def test_moving_clips_slide_each_photo_subject_at_the_world_speeds():
    from custvid_core.world.latent import decode

    world = build_world(TINY)
    case = load_cases()[0]
    subject = subject_set(world, case, preservation=0, moving_clips=2)
    n = len(case.subject_images())
    moving = subject.moving
    assert moving.latents.shape == (2 * n, 16, 1, 32, 32) and moving.masks.shape == (2 * n, 1, 1, 32, 32)
    assert torch.equal(moving.context, subject.context) and subject_set(world, case, preservation=0).moving is None
    # A moving clip's mask covers the subject along its path: more cells than the photo's own mask.
    assert bool((moving.masks.flatten(1).sum(1) > subject.masks.repeat_interleave(2, 0).flatten(1).sum(1)).all())
    frames = decode(moving.latents)  # [2n, 5, 32, 32, 3]
    photo = case.subject_images()[0]
    colour = photo.frames[0][photo.masks[0] > 0].mean(0)

    def centre(frame):  # where the subject's colour is
        ys, xs = torch.nonzero((frame - colour).abs().sum(-1) < 0.15, as_tuple=True)
        return torch.stack([xs.float().mean(), ys.float().mean()])

    spec = case.spec
    for clip in frames:
        per_frame = float((centre(clip[-1]) - centre(clip[0])).norm()) / (spec.frames - 1)
        assert spec.speed[0] - 0.6 <= per_frame <= spec.speed[1] + 0.6


def test_motion_clips_in_other_colours_keep_their_caption_and_flow():
    world = build_world(TINY)
    case = load_cases()[0]
    raft = build_raft("raft_small")
    plain, hued = motion_set(world, case, raft), motion_set(world, case, raft, hue_copies=2)
    n = len(case.motion_clips())
    assert hued.latents.shape[0] == hued.flow.shape[0] == hued.stills.shape[0] == hued.context.shape[0] == 3 * n
    assert torch.equal(hued.latents[::3], plain.latents) and torch.equal(hued.context[::3], plain.context)
    assert torch.equal(hued.flow[::3], plain.flow)
    assert torch.equal(hued.context[1], hued.context[0]) and torch.equal(hued.flow[2], hued.flow[0])
    assert not torch.allclose(hued.latents[1], hued.latents[0])


def test_schedules_follow_smrabooth_timing():
    subject = SMRABOOTH_TIMING["subject"]
    assert [subject.at(i / 50) for i in (0, 14, 15, 49)] == [0.6, 0.6, 0.8, 0.8]
    assert StrengthSchedule.parse("0:0.6, 0.3:0.8") == subject
    assert StrengthSchedule.parse("0.7").is_constant


def test_the_full_method_trains_saves_and_generates_leaving_the_world_unchanged(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    torch.manual_seed(0)
    encoders = {"dino": build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny"),
                "raft": build_raft("raft_small")}
    method = lora_methods(steps=2, lr=1e-3)["full"]
    method = replace(method, sampling_steps=2, encoders=encoders)
    before = {k: v.clone() for k, v in world.backbone.model.state_dict().items()}
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": "sks", "motion": "mtn"}
    clips = run(["sks mtn"], 0)
    assert clips.shape == (1, 5, 32, 32, 3)
    after = world.backbone.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"{case.name}_motion.safetensors", f"{case.name}_subject.safetensors"]
    tensors, spec, meta = read_lora(tmp_path / files[1])
    assert spec.name == "subject" and meta["custvid.lora.info"]["trigger"] == "sks"
    # The scheduled run and a constant-strength run differ; both differ from the base model.
    base = generate(world, ["sks mtn"], seed=0, steps=2, progress=lambda *_: None)
    method_constant = replace(method, schedules=None)
    run_constant, _ = method_constant.prepare(world, case, tmp_path)  # resumes the finished checkpoints
    constant = run_constant(["sks mtn"], 0)
    assert not torch.allclose(clips, constant) and not torch.allclose(constant, base)


def _trained(spec, tensors, trigger=None) -> TrainedParts:
    """A subject or motion LoRA read back from its file (and a trigger embedding), as a run returns them."""
    parts = {spec.name: Exported("lora", tensors, {"spec": spec.to_dict()})}
    if trigger is not None:
        parts["trigger"] = Exported("trigger_embedding", {"trigger_embedding": trigger}, {"trigger_words": "sks"})
    return TrainedParts(parts, [], spec.name)


def test_merged_and_scheduled_sampling_agree_for_constant_strengths(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    method = lora_methods(steps=2, lr=1e-2)["plain_lora"]
    run, _ = replace(method, sampling_steps=2).prepare(world, case, tmp_path)
    merged = run(["sks mtn"], 0)
    subject = torch.load(tmp_path / "subject" / "checkpoint.pt", weights_only=True)
    assert subject["step"] == 2
    # The same LoRAs under a schedule that steps by a negligible amount run unmerged, step by step.
    loras = []
    for name in ("subject", "motion"):
        tensors, spec, _ = read_lora(tmp_path / f"{case.name}_{name}.safetensors")
        loras.append(_trained(spec, tensors))
    almost_constant = {"subject": StrengthSchedule(((0.0, 1.0), (0.5, 1.0 + 1e-7)))}
    assert not almost_constant["subject"].is_constant
    unmerged = generate_with_loras(world, loras, ["sks mtn"], 0, almost_constant, steps=2)
    assert torch.allclose(merged, unmerged, atol=1e-4)


def test_a_trigger_embedding_is_saved_and_added_at_sks_only_while_generating(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    method = lora_methods(steps=2, lr=1e-2)["plain_lora"]
    method = replace(method, subject=replace(method.subject, trigger_embedding=True), sampling_steps=2)
    words = world.text.embedding.weight.clone()
    run, _ = method.prepare(world, case, tmp_path)
    with_embedding = run(["sks mtn"], 0)
    assert torch.equal(world.text.embedding.weight, words)
    learned = load_trigger_embedding(tmp_path / f"{case.name}_subject_trigger_embedding.safetensors")
    saved = learned.residual
    assert learned.trigger_words == "sks" and saved.shape == (1, world.text.embedding.weight.shape[1])
    assert float(saved.abs().max()) > 0
    loras = [_trained(spec, tensors) for tensors, spec, _ in
             (read_lora(tmp_path / f"{case.name}_{name}.safetensors") for name in ("subject", "motion"))]
    assert torch.allclose(generate_with_loras(world, [_trained(loras[0].spec, loras[0].tensors, saved), loras[1]],
                                              ["sks mtn"], 0, steps=2), with_embedding, atol=1e-5)
    assert not torch.allclose(generate_with_loras(world, loras, ["sks mtn"], 0, steps=2), with_embedding, atol=1e-3)


def test_the_ladder_trains_on_the_noise_levels_the_world_was_pretrained_on():
    from custvid_core.world.train import TrainConfig, sigma_sampler

    pretraining = sigma_sampler(TrainConfig(sigma_sampling="shifted"))
    for method in lora_methods().values():
        assert method.motion.sigmas == pretraining, method.name
        assert method.subject is None or method.subject.sigmas == pretraining, method.name


def test_the_motion_lora_alone_is_prompted_with_a_motion_clip_subject(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    method = replace(lora_methods(steps=2, lr=1e-2)["motion_lora_only"], sampling_steps=2)
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": case.motion_clips()[0].prompt, "motion": "mtn"}
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"{case.name}_motion.safetensors"]
    prompt = case.prompt_texts(words["subject"], words["motion"])
    assert not torch.allclose(run(prompt, 0), generate(world, prompt, seed=0, steps=2, progress=lambda *_: None))


def test_the_transfer_baselines_prompt_the_cases_subject_and_time_only_the_motion_lora(tmp_path):
    world = build_world(TINY)
    case = load_cases(DEFAULT_CASES.with_name("transfer.json"))[0]
    method = replace(lora_methods(steps=2, lr=1e-2)["smrabooth_motion_transfer"], sampling_steps=2,
                     encoders={"raft": build_raft()})
    assert method.subject is None and set(method.schedules) == {"subject", "motion"}
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": "red striped circle", "motion": "mtn"}
    assert run(case.prompt_texts(words["subject"], words["motion"]), 0).shape == (1, 5, 32, 32, 3)
    with pytest.raises(InputError, match="subject_words"):
        replace(method, subject_words="photo")


@pytest.mark.parametrize("name", ["full_still", "joint"])
def test_the_stillness_and_joint_methods_keep_only_the_subject_and_motion_loras(tmp_path, name):
    world = build_world(TINY)
    case = load_cases()[0]
    torch.manual_seed(0)
    encoders = {"dino": build_dinov2({**DINO_CONFIG, "num_hidden_layers": 1}, name="tiny"),
                "raft": build_raft("raft_small")}
    method = replace(lora_methods(steps=2, lr=1e-3)[name], sampling_steps=2, encoders=encoders)
    run, words = method.prepare(world, case, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"{case.name}_motion.safetensors",
                                                                       f"{case.name}_subject.safetensors"]
    subject, spec, _ = read_lora(tmp_path / f"{case.name}_subject.safetensors")
    assert spec.name == "subject" and not any("still" in k for k in subject)
    history = torch.load(next(tmp_path.rglob("checkpoint.pt")), weights_only=True)["history"]
    kinds = {k for record in history for k in record}
    if name == "full_still":  # 3 steps: stills, photos, preservation clips
        assert len(history) == 3 and {"stillness", "region", "preservation"} <= kinds
    else:  # one run: subject and motion steps drawn at random
        assert len(history) == 4
    assert run(["sks mtn"], 0).shape == (1, 5, 32, 32, 3)


def test_subject_prior_clips_are_the_frozen_worlds_own_samples_of_its_vocabulary_cached_per_model(tmp_path, monkeypatch):
    from custvid_core.training.prior_clips import PriorPrompt
    from custvid_core.world import customize
    from custvid_core.world.sample import generate_latents
    from custvid_core.world.text import VOCABULARY

    world = build_world(TINY)
    weights = {k: v.clone() for k, v in world.backbone.model.state_dict().items()}
    clips = customize.subject_prior_clips(world, tmp_path, count=2, seed=3, steps=2)
    assert all(torch.equal(v, weights[k]) for k, v in world.backbone.model.state_dict().items())
    assert clips.latents.shape == (2, 16, 1, 32, 32) and clips.context.shape == (2, 16, 4096)
    for k, prompt in enumerate(clips.prompts):
        assert prompt.action.startswith("moving ") and set(prompt.text.split()) <= set(VOCABULARY)
        assert torch.equal(clips.context[k], world.text(prompt.text)[0])
        assert torch.allclose(clips.latents[k], generate_latents(world, prompt.text, seed=3 + k, steps=2,
                                                                 progress=lambda *_: None)[0])
    own = customize.subject_prior_clips(world, tmp_path, count=1, steps=2, prompts=[PriorPrompt("green cross", "moving up")])
    assert own.prompts[0].text == "green cross moving up" and torch.equal(own.context[0], world.text("green cross moving up")[0])
    monkeypatch.setattr(customize, "generate_latents", lambda *a, **k: pytest.fail("a cached clip was generated again"))
    assert torch.equal(customize.subject_prior_clips(world, tmp_path, count=2, seed=3, steps=2).latents, clips.latents)
    other = build_world(TINY, seed=1)  # another model: the first model's clips are refused for it
    assert clips.base_model == customize.world_fingerprint(world) != customize.world_fingerprint(other)
    with pytest.raises(InputError) as refused:
        clips.require_model(customize.world_fingerprint(other))
    assert refused.value.input_name == "prior_clips"
