"""Joint LoRA training with DualReal's StageBlender controller weighing the subject and the motion LoRA, on a tiny
diffusers Wan: the weights per group of blocks and per batch row, the gradient into the controller, the gradient
mask, and the trained controller applied again from its export."""

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters.dualreal import DualAdapterPart, DualRealWeights, load_dualreal, save_dualreal
from custvid_core.adapters.lora import MOTION_ROLES, SUBJECT_ROLES, LoraPart, LoraSpec, base_model_signature
from custvid_core.adapters.parts import Exported, attached
from custvid_core.adapters.stage_blender import LORA_WEIGHTING, StageBlenderPart, block_groups, dualreal_parts
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import (
    JointController,
    MotionSettings,
    OptimSettings,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    engine,
    joint_dualreal,
    train_joint,
)
from custvid_core.training.customize import joint_recipes

BLOCKS = 3


def _loras():
    return LoraPart(LoraSpec("subject", SUBJECT_ROLES, 4)), LoraPart(LoraSpec("motion", MOTION_ROLES, 4))


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)


def _give_outputs(*parts):
    """LoRAs start as the identity (up = 0): give their up projections values, from a fixed generator."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for part in parts:
            for p in part.groups()[part.name]:
                if p.abs().max() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_the_controller_weighs_each_lora_per_group_of_blocks_and_per_batch_row():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs()
    sigma = torch.tensor([0.3, 0.8])
    subject, motion = _loras()
    controller = StageBlenderPart("joint_controller", subject, motion, groups=2, weighting=LORA_WEIGHTING)
    with torch.no_grad(), attached(backbone, [subject, motion, controller]):
        _give_outputs(subject, motion)
        controlled_at_start = backbone.forward(x, sigma, context)
        # Both LoRAs at 1.0 in every block at initialisation: what the LoRAs alone at strength 1.0 give.
        assert torch.allclose(subject.adapters.block_weights["subject"], torch.ones(2, BLOCKS))
        assert torch.allclose(motion.adapters.block_weights["motion"], torch.ones(2, BLOCKS))
        controller.module.fuse[-1].weight.normal_(generator=torch.Generator().manual_seed(4))
        controller.module.fuse[-1].bias.copy_(torch.tensor([-1.5, 1.0]))
        controlled = backbone.forward(x, sigma, context)
        w = controller.identity_weights()  # [2 rows, 2 groups]: 2 * sigmoid
        assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[:, 0], w[:, 1])
    with torch.no_grad(), attached(backbone, [subject, motion]):
        _give_outputs(subject, motion)
        plain = backbone.forward(x, sigma, context)
        of_block = block_groups(2, BLOCKS)
        for row in range(2):  # the same LoRAs at one strength per block (peft's own scaling), row by row
            subject.set_strength(w[row, of_block])
            motion.set_strength(2.0 - w[row, of_block])
            by_strength = backbone.forward(x[row:row + 1], sigma[row:row + 1], context[row:row + 1])
            assert torch.allclose(controlled[row:row + 1], by_strength, atol=1e-5)
    assert torch.allclose(controlled_at_start, plain, atol=1e-5)
    assert (controlled - plain).abs().max() > 1e-3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())


def test_the_lora_weights_carry_the_gradient_into_the_controller():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs()
    subject, motion = _loras()
    controller = StageBlenderPart("joint_controller", subject, motion, weighting=LORA_WEIGHTING)
    with attached(backbone, [subject, motion, controller]):
        _give_outputs(subject, motion)
        backbone.forward(x, torch.tensor([0.3, 0.8]), context).square().mean().backward()
        last = controller.module.fuse[-1].weight.grad
        assert last is not None and last.abs().max() > 0


def _data():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    subject = SubjectSet(torch.randn(3, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), masks)
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    return subject, clips


def _settings():
    subject = SubjectSettings(rank=4, alignment_block=1, projector_hidden=32)
    motion = MotionSettings(rank=4, spatial_rank=2, alignment_weight=0.0)
    return subject, motion


def _lora_ups(backbone, adapter):
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if f"lora_B.{adapter}." in n}


def test_a_joint_run_with_the_controller_steps_one_lora_at_a_time_and_the_controller_every_time(monkeypatch):
    zeroed = []  # the parts switched off around each step
    real_strengths_set = engine.strengths_set

    def recording_strengths_set(parts, strengths):
        zeroed.append({n for n, v in strengths.items() if v == 0.0})
        return real_strengths_set(parts, strengths)

    monkeypatch.setattr(engine, "strengths_set", recording_strengths_set)
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    optim = OptimSettings(steps=10, lr=1e-2, warmup=1)
    recipes, schedule = joint_recipes(backbone, *_data(), *_settings(), optim.seed,
                                      controller=JointController(groups=2))
    controller = recipes[2].parts[0]
    snapshots = []

    def record(step, total, rec):
        snapshots.append((set(rec), _lora_ups(backbone, "subject"), _lora_ups(backbone, "motion"),
                          [p.detach().clone() for p in controller.module.parameters()]))

    subject_lora, motion_lora, trained_controller = engine.run(backbone, recipes, schedule, optim, progress=record)
    subject_steps = {i for i, (keys, *_) in enumerate(snapshots) if "region" in keys}
    assert 0 < len(subject_steps) < 10
    assert all({"subject_weight_0", "subject_weight_1"} <= keys for keys, *_ in snapshots)
    weights = [[r[f"subject_weight_{g}"] for g in range(2)] for r in subject_lora.history]
    assert weights[0] == [1.0, 1.0] and weights[-1] != weights[0]  # 1.0 at first, then learned
    for i in range(1, 10):
        (_, s_now, m_now, c_now), (_, s_before, m_before, c_before) = snapshots[i], snapshots[i - 1]
        subject_moved = any(not torch.equal(s_now[n], s_before[n]) for n in s_now)
        motion_moved = any(not torch.equal(m_now[n], m_before[n]) for n in m_now)
        assert subject_moved == (i in subject_steps) and not (subject_moved and motion_moved), i
        assert any(not torch.equal(a, b) for a, b in zip(c_now, c_before)), i  # the controller learns every step
    # The motion recipe's throw-away spatial LoRA is off on the subject steps only: the controller's recipe owns none.
    assert [i for i, z in enumerate(zeroed) if z == {"motion_spatial"}] == sorted(subject_steps)
    assert all(z <= {"motion"} for i, z in enumerate(zeroed) if i not in subject_steps)  # the spatial task's
    assert set(trained_controller.parts) == {"joint_controller"}
    exported = trained_controller.parts["joint_controller"]
    assert exported.kind == "stage_blender" and exported.metadata["weighting"] == LORA_WEIGHTING
    assert exported.metadata["groups"] == 2
    assert subject_lora.spec.name == "subject" and motion_lora.spec.name == "motion"
    after = backbone.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in n for n, _ in backbone.model.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())


def test_the_trained_loras_and_controller_apply_again_from_their_exports():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    trained = train_joint(backbone, *_data(), *_settings(), OptimSettings(steps=6, lr=3e-2, warmup=1),
                          controller=JointController(groups=3))
    subject, motion = (LoraPart(t.spec, tensors=t.tensors) for t in trained[:2])
    controller = StageBlenderPart.from_exported("joint_controller", trained[2].parts["joint_controller"], subject,
                                                motion)
    x, context = _inputs()
    with torch.no_grad():
        with attached(backbone, [subject, motion, controller]):
            applied = backbone.forward(x, torch.tensor([0.3, 0.8]), context)
            again = [part.export().tensors for part in (subject, motion)]
            weights = controller.identity_weights()
        with attached(backbone, [subject, motion]):
            without_controller = backbone.forward(x, torch.tensor([0.3, 0.8]), context)
    assert all(torch.equal(tensors[k], v) for tensors, t in zip(again, trained) for k, v in t.tensors.items())
    assert (weights - 1.0).abs().max() > 1e-4  # the trained controller moved off its starting 1.0
    assert (applied - without_controller).abs().max() > 1e-5


def _run_parts(trained):
    """The run's own LoRAs and controller, as parts."""
    subject, motion = (LoraPart(t.spec, tensors=t.tensors) for t in trained[:2])
    if len(trained) == 2:
        return [subject, motion]
    return [subject, motion, StageBlenderPart.from_exported("c", trained[2].parts["joint_controller"], subject, motion)]


def _forward(backbone, parts):
    x, context = _inputs()
    with torch.no_grad(), attached(backbone, parts):
        return backbone.forward(x, torch.tensor([0.3, 0.8]), context)


@pytest.mark.parametrize("controlled", [True, False])
def test_a_joint_run_saved_as_a_dualreal_loads_and_applies_as_the_run_does(tmp_path, controlled):
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    trained = train_joint(backbone, *_data(), *_settings(), OptimSettings(steps=6, lr=3e-2, warmup=1),
                          controller=JointController(groups=3) if controlled else None)
    loaded = load_dualreal(save_dualreal(tmp_path / "pair.safetensors", joint_dualreal(trained, backbone)))
    assert sorted(loaded.parts) == sorted(["identity", "motion", *(["controller"] if controlled else [])])
    assert loaded.condition_dim == 0
    assert all(loaded.parts[role].metadata["base_model"] == base_model_signature(backbone)
               for role in ("identity", "motion"))
    parts = dualreal_parts(loaded)
    assert len(parts) == (3 if controlled else 2)
    from_file, by_run = _forward(backbone, parts), _forward(backbone, _run_parts(trained))
    assert torch.allclose(from_file, by_run, atol=1e-6)
    assert (from_file - _forward(backbone, [])).abs().max() > 1e-4  # the LoRAs act
    if controlled:  # and the trained controller with them
        assert (from_file - _forward(backbone, _run_parts(trained[:2]))).abs().max() > 1e-5


def test_a_saved_pair_with_a_damaged_part_is_refused_naming_the_input(tmp_path):
    """A LoRA cut short or without its base model, a controller weighing LoRAs as adapters, and a LoRA pair's
    controller over DualReal adapters."""
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    trained = train_joint(backbone, *_data(), *_settings(), OptimSettings(steps=1), controller=JointController())
    pair = joint_dualreal(trained, backbone)
    cut = dict(pair.parts["motion"].tensors)
    cut.pop(next(k for k in cut if k.endswith(".lora_up.weight")))
    damaged = [{**pair.parts, "motion": Exported("lora", cut, pair.parts["motion"].metadata)},
               {**pair.parts, "motion": Exported("lora", cut, {"base_model": {}})},
               {**pair.parts, "controller": Exported("stage_blender", pair.parts["controller"].tensors,
                                                     {**pair.parts["controller"].metadata, "weighting": "code"})}]
    adapters = [DualAdapterPart("i", "identity"), DualAdapterPart("m", "motion")]
    with torch.no_grad(), attached(backbone, adapters):
        damaged.append({**{p.role: p.export() for p in adapters}, "controller": pair.parts["controller"]})
    for parts in damaged:
        with pytest.raises(InputError, match="^dualreal_name"):
            dualreal_parts(DualRealWeights(parts), input_name="dualreal_name")


def test_bad_joint_settings_are_refused_with_the_input_named():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    with pytest.raises(InputError, match="groups"):
        train_joint(backbone, *_data(), *_settings(), OptimSettings(steps=1), controller=JointController(groups=4))
    with pytest.raises(InputError, match="motion_probability"):
        train_joint(backbone, *_data(), *_settings(), OptimSettings(steps=1), motion_probability=0.0,
                    controller=JointController())


def test_a_stopped_run_with_the_controller_resumes_bit_identically(tmp_path):
    optim = OptimSettings(steps=6, lr=1e-2, warmup=1, checkpoint_every=2)

    def run(workdir, **kw):
        return train_joint(describe(tiny_diffusers_wan(BLOCKS)), *_data(), *_settings(), optim, workdir=workdir,
                           controller=JointController(groups=2), **kw)

    full = run(tmp_path / "a")

    class Interrupted(Exception):
        pass

    def stop_after_four(step, total, record):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path / "b", progress=stop_after_four)
    logs = []
    resumed = run(tmp_path / "b", log=logs.append)
    assert logs == ["resumed from step 4 of 6"]
    assert [r["loss"] for r in resumed[0].history] == [r["loss"] for r in full[0].history]
    for trained, again in zip(full, resumed):
        for name, part in trained.parts.items():
            assert all(torch.equal(v, again.parts[name].tensors[k]) for k, v in part.tensors.items())
    logs.clear()
    train_joint(describe(tiny_diffusers_wan(BLOCKS)), *_data(), *_settings(), optim, workdir=tmp_path / "b",
                log=logs.append)
    assert logs and logs[0].startswith("trained afresh")  # without the controller: another run
