"""SynMotion as a shapes-world benchmark method: trained on a case's motion clips and the world's prior clips,
generated for the case's subject with the motion embedding and LoRA on (tiny runs), and its methods-file entries."""

from dataclasses import replace

import torch

from custvid_core.adapters.lora import read_lora
from custvid_core.adapters.parts import Exported
from custvid_core.adapters.synmotion import load_synmotion
from custvid_core.control import SMRABOOTH_TIMING, ScheduledStrengths
from custvid_core.representations.subject import build_dinov2
from custvid_core.training.engine import TrainedParts
from custvid_core.world.bench.methods import dualreal_methods, lora_methods, method_names, synmotion_methods
from custvid_core.world.cases import load_cases
from custvid_core.world.encoders import DINO_CONFIG
from custvid_core.world.model import DEFAULT_CONFIG, build_world
from custvid_core.world.sample import generate
from custvid_core.world.synmotion import generate_with_synmotion

TINY = {**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64}


def test_the_method_trains_on_the_clips_and_prior_clips_and_generates_the_cases_subject_with_the_motion(tmp_path):
    world = build_world(TINY)
    case = load_cases()[0]
    method = replace(synmotion_methods(steps=6)["synmotion"], sampling_steps=2, prior_clips=2)
    before = {k: v.clone() for k, v in world.backbone.model.state_dict().items()}
    words_before = world.text.embedding.weight.clone()
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": "orange star", "motion": "mtn"}
    assert len(list((tmp_path / "prior_clips").glob("*.safetensors"))) == 1  # the world's own, cached
    prompts = ["orange star mtn", "green square mtn"]
    clips = run(prompts, 0)
    assert clips.shape == (2, 5, 32, 32, 3)
    after = world.backbone.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before) and torch.equal(world.text.embedding.weight, words_before)
    assert not any(m._forward_pre_hooks for m in world.backbone.model.modules())  # the text edit is gone
    assert not torch.allclose(clips, generate(world, prompts, seed=0, steps=2, progress=lambda *_: None))
    learned = load_synmotion(tmp_path / f"{case.name}_synmotion_embeddings.safetensors")
    assert learned.motion_words == "mtn" and learned.motion_residual.abs().max() > 0
    # The saved files generate the same clips, and the embedding acts: the LoRA alone generates other ones.
    tensors, spec, _ = read_lora(tmp_path / f"{case.name}_synmotion_lora.safetensors")
    trained = TrainedParts({spec.name: Exported("lora", tensors, {"spec": spec.to_dict()})}, [], spec.name)
    assert torch.equal(generate_with_synmotion(world, trained, learned, prompts, 0, steps=2), clips)
    no_embeddings = replace(learned, motion_residual=torch.zeros_like(learned.motion_residual), refiner=None)
    assert not torch.allclose(generate_with_synmotion(world, trained, no_embeddings, prompts, 0, steps=2), clips)


def test_without_prior_clips_none_are_generated(tmp_path):
    world = build_world(TINY)
    method = replace(synmotion_methods(steps=3)["synmotion_no_prior"], sampling_steps=2)
    run, _ = method.prepare(world, load_cases()[0], tmp_path)
    assert not (tmp_path / "prior_clips").exists()
    assert run(["orange star mtn"], 0).shape == (1, 5, 32, 32, 3)


def test_the_methods_file_names_synmotion_and_its_ablations():
    methods = synmotion_methods()
    assert list(methods) == ["synmotion", "synmotion_no_prior", "synmotion_no_refiner", "synmotion_no_alternation",
                             "synmotion_subject"]
    combined, full_moving = methods.pop("synmotion_subject"), lora_methods()["full_moving"]
    assert combined.subject == full_moving and combined.settings == methods["synmotion"].settings
    assert set(methods) <= set(method_names()) and not set(methods) & (set(lora_methods()) | set(dualreal_methods()))
    motion_steps = lora_methods()["full"].motion.optim.steps
    changed = {n: (m.settings.prior, m.settings.refiner, m.settings.alternation) for n, m in methods.items()}
    assert changed == {"synmotion": (True, True, True), "synmotion_no_prior": (False, True, True),
                       "synmotion_no_refiner": (True, False, True), "synmotion_no_alternation": (True, True, False)}
    for name, m in methods.items():
        s = m.settings
        motion_share = s.motion_probability if s.prior else 1.0
        assert s.optim.steps * motion_share == motion_steps, name  # the clips get the ladder's motion steps
        assert s.optim.lr == 1e-3 and s.sigmas == lora_methods()["full"].motion.sigmas, name
        assert s.rank == lora_methods()["full"].motion.rank, name


def test_combined_use_trains_the_subject_recipe_too_and_generates_sks_mtn_with_both_loras_and_edits(tmp_path,
                                                                                                      monkeypatch):
    world = build_world(TINY)
    case = load_cases()[0]
    method = replace(synmotion_methods(steps=4)["synmotion_subject"], sampling_steps=2, prior_clips=2)
    method = replace(method, subject=replace(method.subject, moving_clips=1, encoders={"dino": build_dinov2(DINO_CONFIG)}))
    timed, before_step = [], ScheduledStrengths.before_step
    monkeypatch.setattr(ScheduledStrengths, "before_step", lambda self, step: (timed.append(dict(self.schedules)),
                                                                              before_step(self, step)))
    run, words = method.prepare(world, case, tmp_path)
    assert words == {"subject": "sks", "motion": "mtn"}
    clips = run(["sks mtn"], 0)
    assert (tmp_path / "subject" / "checkpoint.pt").exists() and (tmp_path / "synmotion" / "checkpoint.pt").exists()
    assert timed and set(timed[0]) == {"subject", "synmotion_lora"}  # the subject's timing, SynMotion's LoRA as motion
    assert timed[0]["subject"] == SMRABOOTH_TIMING["subject"]
    motion_only, _ = replace(method, subject=None).prepare(world, case, tmp_path)
    assert not torch.allclose(clips, motion_only(["sks mtn"], 0))  # the subject LoRA and its trigger embedding act
