"""DualReal: the dual adapters, the StageBlender controller and the joint recipe, on a tiny diffusers Wan."""

from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters.dualreal import (
    FIXED_WEIGHT,
    DualAdapterPart,
    DualAdapterSpec,
    load_dualreal,
    save_dualreal,
)
from custvid_core.adapters.lora import save_lora
from custvid_core.adapters.parts import attached
from custvid_core.adapters.stage_blender import StageBlenderPart, block_groups, dualreal_parts, group_count
from custvid_core.backbones import describe
from custvid_core.backbones.wan import RESIDUAL_SITES
from custvid_core.errors import InputError
from custvid_core.training import MovingClips, OptimSettings, SubjectSet, VideoSet, engine
from custvid_core.training.dualreal import (
    DualRealSettings,
    ImageEmbeddings,
    dualreal_recipe,
    dualreal_weights,
    train_dualreal,
)

BLOCKS = 3


def _data():
    g = torch.Generator().manual_seed(0)
    subject = SubjectSet(torch.randn(3, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g))
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    return subject, clips


def _embeddings(width=12):
    g = torch.Generator().manual_seed(3)
    return ImageEmbeddings(torch.randn(2, width, generator=g), torch.randn(1, width, generator=g))


def _settings(steps=6, **kw):
    return DualRealSettings(bottleneck=8, optim=OptimSettings(steps=steps, lr=1e-3, warmup=1, checkpoint_every=2,
                                                              weight_decay=1e-4, betas=(0.9, 0.95)), **kw)


def _inputs(batch=1):
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 16, 2, 8, 8, generator=g), torch.randn(batch, 5, 64, generator=g)


def _pair(residual="code", seed=0, width=0):
    identity = DualAdapterPart("dr_identity", "identity", DualAdapterSpec(8, 0, 1.0, residual), seed)
    motion = DualAdapterPart("dr_motion", "motion", DualAdapterSpec(8, width, 1.0, residual), seed)
    return identity, motion


@pytest.mark.parametrize("residual", ["code", "pure"])
def test_adapters_at_initialisation_add_their_weight_times_the_sublayer_input_or_nothing(residual):
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs()
    with torch.no_grad():
        plain = backbone.forward(x, 0.4, context)
        with attached(backbone, _pair(residual)):
            with_adapters = backbone.forward(x, 0.4, context)
        handles = [backbone.add_residual(b, site, lambda h: 2 * FIXED_WEIGHT * h)  # identity + motion: 0.1 x each
                   for b in range(BLOCKS) for site in RESIDUAL_SITES]
        expected = backbone.forward(x, 0.4, context)
        for h in handles:
            h.remove()
    if residual == "code":
        assert (expected - plain).abs().max() > 1e-3
        assert torch.allclose(with_adapters, expected, atol=1e-6)
    else:
        assert torch.equal(with_adapters, plain)


def test_the_controller_starts_at_0_1_each_and_then_changes_nothing_against_fixed_weights():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs(batch=2)
    identity, motion = _pair()
    controller = StageBlenderPart("dr_controller", identity, motion)
    with torch.no_grad():
        with attached(backbone, [identity, motion]):
            fixed = backbone.forward(x, torch.tensor([0.2, 0.9]), context)
        with attached(backbone, [identity, motion, controller]):
            controlled = backbone.forward(x, torch.tensor([0.2, 0.9]), context)
            weights = identity.block_weights, motion.block_weights
    assert all(w.shape == (2, BLOCKS) and torch.allclose(w, torch.full_like(w, 0.1)) for w in weights)
    assert torch.allclose(controlled, fixed, atol=1e-6)
    paper = StageBlenderPart("dr_controller", identity, motion, weighting="paper")
    with torch.no_grad(), attached(backbone, [identity, motion, paper]):
        backbone.forward(x, 0.5, context)
        assert torch.allclose(identity.block_weights, torch.full((2, BLOCKS), 0.5))
        assert torch.allclose(motion.block_weights, torch.full((2, BLOCKS), 0.5))


def test_the_block_weights_carry_the_gradient_into_the_controller_and_a_strength_tensor():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs()
    identity, motion = _pair(residual="pure")
    controller = StageBlenderPart("dr_controller", identity, motion)
    strength = torch.ones(BLOCKS, requires_grad=True)
    with attached(backbone, [identity, motion, controller]):
        with torch.no_grad():  # give the adapters an output (up starts at zero)
            for part in (identity, motion):
                for p in part.module.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        identity.set_strength(strength)
        backbone.forward(x, 0.4, context).square().mean().backward()
        last = controller.module.fuse[-1].weight.grad
        assert last is not None and last.abs().max() > 0
        assert strength.grad is not None and (strength.grad.abs() > 0).all()
        # The zero last layer holds back the earlier layers' gradient at first; once it has learned, they learn too.
        with torch.no_grad():
            controller.module.fuse[-1].weight.normal_(generator=torch.Generator().manual_seed(4))
        backbone.forward(x, 0.4, context).square().mean().backward()
        first = controller.module.tokens.weight.grad
        assert first is not None and first.abs().max() > 0


@pytest.mark.parametrize("groups, expected", [
    (1, [0, 0, 0, 0, 0, 0]), (2, [0, 0, 0, 1, 1, 1]), (3, [0, 0, 1, 1, 2, 2]), (6, [0, 1, 2, 3, 4, 5]),
])
def test_groups_are_runs_of_consecutive_blocks(groups, expected):
    assert block_groups(groups, 6).tolist() == expected


def test_group_counts_default_to_seven_or_every_block_and_refuse_more_than_the_blocks():
    assert block_groups(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert group_count(None, 30) == 7 and group_count(None, 3) == 3 and group_count(2, 3) == 2
    with pytest.raises(InputError, match="groups"):
        group_count(4, 3)
    with pytest.raises(InputError, match="groups"):
        train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), *_data(), _settings(1, groups=4))


def test_each_group_of_blocks_gets_its_own_controller_weight():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    x, context = _inputs()
    identity, motion = _pair()
    controller = StageBlenderPart("dr_controller", identity, motion, groups=2)
    with torch.no_grad(), attached(backbone, [identity, motion, controller]):
        controller.module.fuse[-1].bias.copy_(torch.tensor([-1.0, 2.0]))
        backbone.forward(x, 0.4, context)
        w = 0.2 * torch.sigmoid(torch.tensor([-1.0, 2.0]))
        assert torch.allclose(identity.block_weights[0], w[[0, 0, 1]])
        assert torch.allclose(motion.block_weights[0], 0.2 - w[[0, 0, 1]])
        assert torch.allclose(controller.identity_weights()[0], w)


def _adapter_snapshot(parts):
    return {p.name: [t.detach().clone() for t in p.module.parameters()] for p in parts}


def test_a_joint_run_steps_one_adapter_at_a_time_and_the_controller_every_time():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    subject, clips = _data()
    settings = _settings(6)
    recipe = dualreal_recipe(backbone, subject, clips, settings, _embeddings())
    snapshots = []
    recipe_parts = recipe.parts

    def record(step, total, rec):
        snapshots.append((rec, _adapter_snapshot(recipe_parts)))

    snapshots.append(({}, None))
    (trained,) = engine.run(backbone, [recipe], recipe.schedule, settings.optim, progress=record)
    tasks = ["motion" if "motion" in rec else "identity" for rec, _ in snapshots[1:]]
    assert set(tasks) == {"motion", "identity"}, tasks  # seed 0 draws both within 6 steps
    for i in range(2, 7):
        now, earlier = snapshots[i][1], snapshots[i - 1][1]
        changed = {n for n in now if any(not torch.equal(a, b) for a, b in zip(now[n], earlier[n]))}
        assert changed == {f"dualreal_{tasks[i - 1]}", "dualreal_controller"}, (i, changed)
    after = backbone.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())
    assert set(trained.parts) == {"dualreal_identity", "dualreal_motion", "dualreal_controller"}
    assert any(k.startswith("blocks.0.self_attn.condition.") for k in trained.parts["dualreal_motion"].tensors)


def test_each_moving_clip_is_conditioned_on_its_own_photos_image_embedding():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    g = torch.Generator().manual_seed(4)
    photo = torch.arange(3).repeat_interleave(2)  # two moving clips per photo
    prompts = (100.0 + photo)[:, None, None].expand(6, 5, 64)  # a moving clip's prompt tells its photo
    subject.moving = MovingClips(torch.randn(6, 16, 2, 8, 8, generator=g), prompts, torch.ones(6, 1, 2, 8, 8), photo)
    embeddings = ImageEmbeddings(torch.randn(2, 12, generator=g), torch.randn(3, 12, generator=g))  # one per photo
    settings = _settings(30, moving_share=1.0)
    recipe = dualreal_recipe(backbone, subject, clips, settings, embeddings)
    motion = next(p for p in recipe.parts if p.name == "dualreal_motion")
    seen, conditions = [], []
    set_condition, forward = motion.set_condition, backbone.forward
    motion.set_condition = lambda c: (conditions.append(c), set_condition(c))[1]
    backbone.forward = lambda x, sigma, context: (seen.append((context[0, 0, 0].item(), conditions[-1])),
                                                  forward(x, sigma, context))[1]
    engine.run(backbone, [recipe], recipe.schedule, settings.optim)
    moving_steps = [(p - 100, c) for p, c in seen if p >= 100]
    assert len({p for p, _ in moving_steps}) == 3  # every photo's clips were drawn
    assert all(torch.equal(c[0], embeddings.subject[int(p)]) for p, c in moving_steps)
    subject.moving.photo = None  # clips of unknown photos cannot take per-photo embeddings
    with pytest.raises(InputError, match="image_embeddings: one per photo"):
        dualreal_recipe(backbone, subject, clips, settings, embeddings)


def test_without_the_gradient_mask_both_adapters_learn_every_step():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    settings = _settings(3, gradient_mask=False, controller=False)
    recipe = dualreal_recipe(backbone, subject, clips, settings)
    snapshots = []
    engine.run(backbone, [recipe], recipe.schedule, settings.optim,
               progress=lambda s, t, r: snapshots.append(_adapter_snapshot(recipe.parts)))
    for now, earlier in zip(snapshots[1:], snapshots):
        assert all(any(not torch.equal(a, b) for a, b in zip(now[n], earlier[n])) for n in now)


def _fixed_batch_loss(backbone, weights, clips, subject):
    """The v-MSE on the clips and on the photos, at fixed noise."""
    g = torch.Generator().manual_seed(11)
    losses = []
    with torch.no_grad(), attached(backbone, dualreal_parts(weights)):
        for latents, context in ((clips.latents, clips.context), (subject.latents, subject.context.expand(3, -1, -1))):
            noise = torch.randn(latents.shape, generator=g)
            v = backbone.forward(0.5 * noise + 0.5 * latents, 0.5, context)
            losses.append(float((v - (noise - latents)).square().mean()))
    return losses


def test_a_joint_run_learns_the_clips_and_the_photos():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    untrained = dualreal_weights(train_dualreal(backbone, subject, clips, _settings(1)))
    settings = _settings(40)
    settings.optim = OptimSettings(steps=40, lr=3e-2, warmup=1, schedule="constant", betas=(0.9, 0.95))
    trained = dualreal_weights(train_dualreal(backbone, subject, clips, settings))
    after, before = _fixed_batch_loss(backbone, trained, clips, subject), _fixed_batch_loss(backbone, untrained, clips,
                                                                                            subject)
    assert after[0] < 0.9 * before[0] and after[1] < 0.9 * before[1]


def test_a_stopped_run_resumes_bit_identically(tmp_path):
    subject, clips = _data()
    settings = _settings(6)
    full = train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), subject, clips, settings, _embeddings(),
                          workdir=tmp_path / "a")

    class Interrupted(Exception):
        pass

    def stop_after_four(step, total, record):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), subject, clips, settings, _embeddings(),
                       workdir=tmp_path / "b", progress=stop_after_four)
    logs = []
    resumed = train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), subject, clips, settings, _embeddings(),
                             workdir=tmp_path / "b", log=logs.append)
    assert logs == ["resumed from step 4 of 6"]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for name, part in full.parts.items():
        assert all(torch.equal(v, resumed.parts[name].tensors[k]) for k, v in part.tensors.items())
    logs.clear()
    other_embeddings = ImageEmbeddings(_embeddings().clips + 1, _embeddings().subject)
    train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), subject, clips, settings, other_embeddings,
                   workdir=tmp_path / "b", log=logs.append)
    assert logs and logs[0].startswith("trained afresh")  # other image embeddings are other data


def test_save_and_load_round_trip_and_apply_the_same_model(tmp_path):
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    weights = dualreal_weights(train_dualreal(backbone, subject, clips, _settings(2), _embeddings()))
    path = save_dualreal(tmp_path / "dr.safetensors", weights)
    loaded = load_dualreal(path)
    assert set(loaded.parts) == {"identity", "motion", "controller"}
    for role, part in weights.parts.items():
        assert loaded.parts[role].kind == part.kind and loaded.parts[role].metadata == part.metadata
        assert all(torch.equal(v, loaded.parts[role].tensors[k]) for k, v in part.tensors.items())
    assert weights.metadata["motion"]["spec"] == {"bottleneck": 8, "condition_dim": 12, "condition_lam": 1.0,
                                                  "residual": "code"}
    assert weights.metadata["controller"]["groups"] == BLOCKS
    x, context = _inputs()
    outputs = []
    for w in (weights, loaded):
        parts = dualreal_parts(w)
        with torch.no_grad(), attached(backbone, parts):
            parts[1].set_condition(_embeddings().subject)
            outputs.append(backbone.forward(x, 0.4, context))
    assert torch.equal(outputs[0], outputs[1])


def test_bad_dualreal_input_is_refused_with_the_input_named(tmp_path):
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    weights = dualreal_weights(train_dualreal(backbone, subject, clips, _settings(1), _embeddings()))
    x, context = _inputs()
    # Another model size.
    with pytest.raises(InputError, match="dualreal_file: made for a model with blocks 3, and this one has blocks 2"):
        with attached(describe(tiny_diffusers_wan(2)), dualreal_parts(weights, input_name="dualreal_file")):
            pass
    # A file of another kind.
    lora = save_lora(tmp_path / "lora.safetensors", {"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 4),
                                                     "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(InputError, match="dualreal_file: 'lora.safetensors' is not a DualReal file"):
        load_dualreal(lora, "dualreal_file")
    # Conditioned adapters without an embedding, or with one of another width; unconditioned ones with one.
    parts = dualreal_parts(weights)
    with attached(backbone, parts), torch.no_grad():
        with pytest.raises(InputError, match="image_embedding.*trained with an image embedding"):
            backbone.forward(x, 0.4, context)
        with pytest.raises(InputError, match=r"image_embedding: shape \(1, 7\)"):
            parts[1].set_condition(torch.zeros(1, 7))
    plain = dualreal_weights(train_dualreal(backbone, subject, clips, _settings(1)))
    parts = dualreal_parts(plain)
    with attached(backbone, parts), pytest.raises(InputError, match="image_embedding.*takes no image embedding"):
        parts[1].set_condition(torch.zeros(1, 12))
    with pytest.raises(InputError, match="image_embeddings"):
        train_dualreal(backbone, subject, clips, _settings(1), ImageEmbeddings(torch.zeros(3, 12), torch.zeros(1, 12)))
    # Nothing half-written: a failed save leaves no file.
    with pytest.raises(InputError):
        save_dualreal(tmp_path / "half.safetensors", type(weights)({"identity": weights.parts["identity"]}))
    assert not list(tmp_path.glob("*half*"))


def test_gradient_checkpointing_trains_the_same_adapters_and_controller():
    subject, clips = _data()
    runs = [train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), subject, clips,
                           _settings(3, gradient_checkpointing=checkpointing), _embeddings())
            for checkpointing in (False, True)]
    assert [r["loss"] for r in runs[0].history] == pytest.approx([r["loss"] for r in runs[1].history], rel=1e-5)
    for name, part in runs[0].parts.items():
        assert all(torch.allclose(v, runs[1].parts[name].tensors[k], atol=1e-6) for k, v in part.tensors.items())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in runs[1].parts["dualreal_identity"].tensors.items()
               if ".up." in k)


def test_adamw_betas_are_used_and_enter_the_checkpoint_fingerprint_only_when_changed():
    from custvid_core.training.loop import StepResult, _fingerprint, train

    def run(betas):
        p = torch.nn.Parameter(torch.ones(3))
        train(lambda i, g: StepResult((p * torch.tensor([1.0, -2.0, 3.0])).sum() * (i + 1)), {"p": [p]},
              OptimSettings(steps=3, lr=0.1, warmup=1, schedule="constant", weight_decay=0.0, grad_clip=1e6,
                            betas=betas))
        return p.detach()

    q = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([q], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    for i in range(3):
        opt.zero_grad()
        ((q * torch.tensor([1.0, -2.0, 3.0])).sum() * (i + 1)).backward()
        opt.step()
    assert torch.allclose(run((0.9, 0.95)), q.detach()) and not torch.allclose(run((0.9, 0.999)), q.detach())
    groups = {"p": [torch.nn.Parameter(torch.ones(3))]}
    assert "betas" not in _fingerprint(groups, OptimSettings(), None)["settings"]  # checkpoints before it resume
    assert _fingerprint(groups, OptimSettings(betas=(0.9, 0.95)), None)["settings"]["betas"] == "(0.9, 0.95)"
    with pytest.raises(InputError, match="betas"):
        OptimSettings(betas=(0.9, 1.5))


def test_each_step_records_the_identity_weight_the_controller_gave_each_group():
    subject, clips = _data()
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    history = train_dualreal(backbone, subject, clips, _settings(4, groups=2)).history
    weights = [[r[f"identity_weight_{g}"] for g in range(2)] for r in history]
    assert weights[0] == pytest.approx([0.1, 0.1])  # the zero-initialised last layer: 0.2 * sigmoid(0)
    assert weights[-1] != pytest.approx([0.1, 0.1], abs=1e-7)  # and then what it learned
    assert not any("identity_weight_0" in r for r in train_dualreal(
        backbone, subject, clips, _settings(2, controller=False)).history)


def test_the_controller_can_learn_at_its_own_rate():
    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()

    def controller_change(controller_lr):
        settings = _settings(3, controller_lr=controller_lr)
        settings.optim = replace(settings.optim, warmup=0, schedule="constant", weight_decay=0.0)
        start = dualreal_weights(train_dualreal(backbone, subject, clips, _settings(1, controller_lr=1e-12)))
        after = dualreal_weights(train_dualreal(backbone, subject, clips, settings))
        t0, t1 = start.parts["controller"].tensors, after.parts["controller"].tensors
        return max(float((t1[k] - t0[k]).abs().max()) for k in t0)

    # Adam moves a weight by about its learning rate a step; the controller has a gradient from the second step on
    # (at the start both adapters add the same).
    assert 0.5e-3 < controller_change(None) <= 3e-3 and 0.5e-5 < controller_change(1e-5) <= 3e-5
    with pytest.raises(InputError, match="controller_learning_rate: 2.0"):
        train_dualreal(backbone, subject, clips, _settings(1, controller_lr=2.0))


def test_saturated_controller_groups_are_found_and_reported():
    from custvid_core.training.dualreal import saturated_groups

    def history(*weights):
        return [{"step": i, **{f"identity_weight_{g}": w for g, w in enumerate(weights)}} for i in range(60)]

    # Group 0 is off, group 2 all identity, group 1 still between (code weighting: at most 0.2).
    assert saturated_groups(history(1e-9, 0.1, 0.19999)) == [0, 2]
    assert saturated_groups(history(1e-9, 0.1, 0.19999), "paper") == [0]
    moving = history(1e-9, 1e-9)
    moving[-10]["identity_weight_1"] = 0.01  # it moved within the last steps
    assert saturated_groups(moving) == [0] and saturated_groups([]) == []

    backbone = describe(tiny_diffusers_wan(BLOCKS))
    subject, clips = _data()
    settings = _settings(16)
    settings.optim = replace(settings.optim, lr=0.05, warmup=1, schedule="constant")
    notes = []
    trained = train_dualreal(backbone, subject, clips, settings, log=notes.append)
    stuck = saturated_groups(trained.history)
    assert stuck, [trained.history[-1][k] for k in trained.history[-1] if k.startswith("identity")]
    assert any("controller is saturated in" in n and str(stuck) in n for n in notes), notes
