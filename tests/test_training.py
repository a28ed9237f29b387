import math
from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters import LoraAdapters, subject_lora
from custvid_core.adapters.parts import Projector
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import (
    MotionSettings,
    MovingClips,
    OptimSettings,
    StepResult,
    SubjectSet,
    SubjectSettings,
    TrainingStopped,
    VideoSet,
    engine,
    train,
    train_joint,
    train_motion,
    train_subject,
)
from custvid_core.training.objectives import (
    SigmaSampler,
    appearance_debiased,
    flow_on_token_grid,
    latent_mask,
    region_loss,
)


def _subject_set(n=3, with_dino=True, preservation=True):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 16, 1, 8, 8, generator=g)
    masks = torch.zeros(n, 1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    return SubjectSet(latents, torch.randn(1, 5, 64, generator=g), masks,
                      torch.randn(n, 24, 5, 5, generator=g) if with_dino else None,
                      clips if preservation else None)


def _quick(settings, steps=4, **optim):
    from dataclasses import replace
    return replace(settings, optim=OptimSettings(steps=steps, lr=1e-3, warmup=1, checkpoint_every=2, **optim),
                   projector_hidden=32)


def test_sigma_sampler_shifts_towards_noise():
    g = torch.Generator().manual_seed(0)
    plain = SigmaSampler("uniform")(10000, g)
    shifted = SigmaSampler("uniform", shift=3.0)(10000, g)
    assert 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0
    assert abs(float(plain.mean()) - 0.5) < 0.02 and float(shifted.mean()) > 0.65
    with pytest.raises(InputError, match="timestep_sampling"):
        SigmaSampler("cubic")


def test_projector_keeps_repa_width_on_real_models_and_narrows_on_small_ones():
    def width(p):
        return p.net[0].out_features

    assert width(Projector(1536, 1024)) == 2048  # Wan 1.3B: SMRABooth's projector
    assert width(Projector(256, 384)) == 1024  # a small model: 4x its width
    assert width(Projector(256, 384, hidden=2048)) == 2048  # an explicit width wins


def test_region_loss_only_counts_the_mask():
    pred, target = torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4)
    target[..., 0, 0] = 3.0  # error outside the mask
    mask = torch.zeros(1, 1, 1, 4, 4)
    mask[..., 2:, 2:] = 1
    assert float(region_loss(pred, target, mask)) == 0.0
    target[..., 3, 3] = 2.0  # inside: 2 channels x 4 = 8 over 8 masked elements
    assert float(region_loss(pred, target, mask)) == pytest.approx(8 / 8)
    assert float(region_loss(pred, target)) == pytest.approx((9 * 2 + 4 * 2) / 32)


def test_latent_mask_marks_any_covered_cell_and_handles_wan_frame_counts():
    masks = torch.zeros(1, 5, 16, 16)
    masks[0, 4, 0, 0] = 1  # one pixel in the last frame
    m = latent_mask(masks, (1, 16, 2, 4, 4))
    assert m.shape == (1, 1, 2, 4, 4)
    assert m.sum() == 1 and m[0, 0, 1, 0, 0] == 1


def test_appearance_debiased_cancels_a_static_clip():
    x = torch.randn(1, 4, 1, 3, 3).expand(1, 4, 5, 3, 3)
    d = appearance_debiased(x, 2)
    assert torch.allclose(d, (math.sqrt(2) - 1) * x)


def test_flow_on_token_grid_sums_displacement_per_frame_group():
    flow = torch.zeros(1, 7, 2, 8, 16)
    flow[:, :, 0] = 2.0  # 2 px right per pair, frame width 16
    tokens = flow_on_token_grid(flow, (2, 4, 8))
    assert tokens.shape == (1, 2, 2, 4, 8)
    # 7 pairs split 4 + 3 (rounded edges 0, 4, 7): 8 px and 6 px over a 16 px frame
    assert torch.allclose(tokens[0, 0, 0], torch.full((4, 8), 8 / 16))
    assert torch.allclose(tokens[0, 0, 1], torch.full((4, 8), 6 / 16))
    assert tokens[0, 1].abs().max() == 0


def test_subject_training_learns_leaves_the_model_alone_and_saves_a_native_lora(tmp_path):
    backbone = describe(tiny_diffusers_wan())
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    settings = _quick(SubjectSettings(rank=4, alignment_block=1), steps=6)
    trained = train_subject(backbone, _subject_set(), settings)
    assert len(trained.history) == 6
    assert {"region", "alignment"} <= set(trained.history[0]) and "preservation" in trained.history[1]
    assert all(r["seconds"] > 0 and math.isfinite(r["loss"]) for r in trained.history)
    after = backbone.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # The LoRA moved away from the identity and uses ComfyUI's names.
    ups = [v for k, v in trained.tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(k.startswith("diffusion_model.blocks.") for k in trained.tensors)
    assert max(float(u.abs().max()) for u in ups) > 0


def test_training_on_a_fixed_batch_lowers_the_loss():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set(n=1, with_dino=False, preservation=False)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(data.latents.shape, generator=g)
    x = 0.5 * noise + 0.5 * data.latents
    with LoraAdapters(backbone, [subject_lora(8)]) as adapters:
        def step(i, _g):  # the same noise every step: the loss must fall if the LoRA trains at all
            return StepResult(region_loss(backbone.forward(x, 0.5, data.context), noise - data.latents))

        history = train(step, {"subject": adapters.parameters("subject")},
                        OptimSettings(steps=60, lr=1e-2, warmup=1, schedule="constant"))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    data = _subject_set()
    settings = _quick(SubjectSettings(rank=4, alignment_block=1), steps=6)
    full = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "a")

    class Interrupted(Exception):
        pass

    def stop_after_four(step, total, record):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "b",
                      progress=stop_after_four)
    logs = []
    resumed = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "b", log=logs.append)
    assert logs == ["resumed from step 4 of 6"]  # the checkpoint of step 4 was written before the stop
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-5)
    for k, v in full.tensors.items():
        assert torch.allclose(v, resumed.tensors[k], atol=1e-6)
    logs.clear()
    again = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "b", log=logs.append)
    assert logs == ["already trained (6 steps)"] and again.history == resumed.history


def test_a_checkpoint_of_other_data_settings_or_model_is_not_resumed(tmp_path):
    """A folder reused for another run trains afresh and says why; the other run's checkpoint is kept aside."""
    import shutil

    data, other_data = _subject_set(), _subject_set()
    other_data.latents = other_data.latents.clone()
    other_data.latents[0, 0, 0, 0, 0] += 1e-3  # one value of one photo
    settings = _quick(SubjectSettings(rank=4, alignment_block=1), steps=2)
    first = train_subject(describe(tiny_diffusers_wan()), data, settings, workdir=tmp_path / "first")
    other_model = tiny_diffusers_wan()
    with torch.no_grad():
        other_model.blocks[1].ffn.net[2].weight[0, 0] += 1e-3  # the same sizes, another checkpoint

    def rerun(folder, data=data, settings=settings, model=None):
        logs = []
        trained = train_subject(describe(model or tiny_diffusers_wan()), data, settings, workdir=tmp_path / folder,
                                log=logs.append)
        return trained, logs

    cases = {"other data": dict(data=other_data), "other model": dict(model=other_model),
             "other settings (region_margin)": dict(settings=replace(settings, region_margin=1)),
             "other settings (lr)": dict(settings=replace(settings, optim=replace(settings.optim, lr=2e-3)))}
    for why, changed in cases.items():
        shutil.copytree(tmp_path / "first", tmp_path / why)
        trained, logs = rerun(why, **changed)
        assert logs == [f"trained afresh: '{tmp_path / why}' held a checkpoint of another run ({why}); "
                        "it is kept as checkpoint.previous.pt"]
        assert [r["step"] for r in trained.history] == [1, 2]
        # Switching back to the first run's data and settings resumes it from the kept checkpoint, and back again.
        again, logs = rerun(why)  # the kept checkpoint and the current one swap
        assert logs == ["already trained (2 steps)"]
        assert all(torch.equal(again.tensors[k], v) for k, v in first.tensors.items())
        again, logs = rerun(why, **changed)
        assert logs == ["already trained (2 steps)"]
        assert all(torch.equal(again.tensors[k], v) for k, v in trained.tensors.items())
    # A longer run of the same data continues the checkpoint; a damaged one is set aside.
    longer, logs = rerun("first", settings=replace(settings, optim=replace(settings.optim, steps=3)))
    assert logs == ["resumed from step 2 of 3"] and len(longer.history) == 3
    (tmp_path / "first" / "checkpoint.pt").write_bytes(b"damaged")
    _, logs = rerun("first")
    assert logs == [f"trained afresh: '{tmp_path / 'first'}' held a checkpoint of another run (an unreadable "
                    "checkpoint); it is kept as checkpoint.previous.pt"]


def test_nan_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))

    def step(i, g):
        loss = (p ** 2).sum()
        return StepResult(loss * float("nan") if i == 5 else loss)

    with pytest.raises(TrainingStopped, match="step 6.*checkpoint of step 4"):
        train(step, {"x": [p]}, OptimSettings(steps=10, lr=1e-3, warmup=1, checkpoint_every=2), workdir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4


def test_gradient_masks_freeze_the_groups_a_step_does_not_name():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))

    def step(i, g):
        return StepResult(((a + b) ** 2).sum(), update=["a"])

    train(step, {"a": [a], "b": [b]}, OptimSettings(steps=3, lr=1e-2, warmup=1))
    assert not torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.ones(2))


def test_motion_training_trains_only_the_motion_lora_and_discards_the_spatial_one():
    backbone = describe(tiny_diffusers_wan())
    g = torch.Generator().manual_seed(0)
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g),
                     torch.randn(2, 7, 2, 32, 32, generator=g))
    trained = train_motion(backbone, clips, _quick(MotionSettings(rank=4, spatial_rank=2, alignment_block=1), 4))
    assert "spatial" in trained.history[0] and {"mse", "debiased", "alignment"} <= set(trained.history[1])
    assert trained.spec.name == "motion"
    assert any(".self_attn.v." in k for k in trained.tensors) and not any(".self_attn.q." in k for k in trained.tensors)
    assert not any("lora" in n for n, _ in backbone.model.named_modules())


def test_a_stillness_lora_learns_stills_of_the_preservation_clips_and_is_thrown_away():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set()
    with pytest.raises(InputError, match="stillness_rank"):  # the clips have no stills
        train_subject(backbone, data, _quick(SubjectSettings(rank=4, alignment_block=1, stillness_rank=2), 1))
    g = torch.Generator().manual_seed(2)
    data.preservation.stills = torch.randn(2, 3, 16, 1, 8, 8, generator=g)
    snapshots = []

    def record(step, total, rec):
        snapshots.append((set(rec), {n: p.detach().clone() for n, p in backbone.model.named_parameters()
                                     if "lora_B." in n}))

    settings = _quick(SubjectSettings(rank=4, alignment_block=1, stillness_rank=2), 6)
    trained = train_subject(backbone, data, settings, progress=record)
    assert ["stillness" in k for k, _ in snapshots] == [True, False, False] * 2
    assert "region" in snapshots[1][0] and "preservation" in snapshots[2][0]
    for i in range(1, 6):
        keys, now = snapshots[i]
        changed = {n.split("lora_B.")[1].split(".")[0] for n in now if not torch.equal(now[n], snapshots[i - 1][1][n])}
        assert changed == ({"subject_stillness"} if "stillness" in keys else {"subject"})
    assert not any("still" in k for k in trained.tensors) and trained.spec.name == "subject"
    assert not any("lora" in n for n, _ in backbone.model.named_modules())


def test_joint_training_steps_one_lora_at_a_time_with_the_other_running_frozen(monkeypatch):
    backbone = describe(tiny_diffusers_wan())
    zeroed = []  # the parts switched off around each step
    real_strengths_set = engine.strengths_set

    def recording_strengths_set(parts, strengths):
        zeroed.append({n for n, v in strengths.items() if v == 0.0})
        return real_strengths_set(parts, strengths)

    monkeypatch.setattr(engine, "strengths_set", recording_strengths_set)
    g = torch.Generator().manual_seed(1)
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g))
    subject = _quick(SubjectSettings(rank=4, alignment_block=1), 1)
    motion = _quick(MotionSettings(rank=4, spatial_rank=2, alignment_weight=0.0), 1)
    snapshots = []

    def lora_weights(adapter):
        return {n: p.detach().clone() for n, p in backbone.model.named_parameters() if f"lora_B.{adapter}." in n}

    def record(step, total, rec):
        snapshots.append((set(rec), lora_weights("subject"), lora_weights("motion")))

    subject_lora, motion_lora = train_joint(backbone, _subject_set(), clips, subject, motion,
                                            OptimSettings(steps=12, lr=1e-3, warmup=1), progress=record)
    subject_steps = [i for i, (keys, _, _) in enumerate(snapshots) if keys & {"region", "preservation"}]
    motion_steps = [i for i, (keys, _, _) in enumerate(snapshots) if keys & {"mse", "spatial"}]
    assert subject_steps and motion_steps and len(subject_steps) + len(motion_steps) == 12
    for i in range(1, 12):  # the adapter that did not step this time is exactly as it was
        (_, s_now, m_now), (_, s_before, m_before) = snapshots[i], snapshots[i - 1]
        subject_stepped = i in subject_steps
        assert all(torch.equal(s_now[n], s_before[n]) for n in s_now) != subject_stepped
        if subject_stepped:
            assert all(torch.equal(m_now[n], m_before[n]) for n in m_now)
    # The motion recipe's throw-away spatial LoRA is off in every subject step.
    assert sum(z == {"motion_spatial"} for z in zeroed) == len(subject_steps)
    assert subject_lora.spec.name == "subject" and motion_lora.spec.name == "motion"
    assert any(t.abs().sum() > 0 for k, t in subject_lora.tensors.items() if "lora_up" in k)
    assert any(".self_attn.v." in k for k in motion_lora.tensors)
    assert not any("lora" in n for n, _ in backbone.model.named_modules())
    with pytest.raises(InputError, match="motion_probability"):
        train_joint(backbone, _subject_set(), clips, subject, motion, motion_probability=1.0)


def test_gradient_checkpointing_gives_the_same_gradients():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set(preservation=False)
    plain = train_subject(backbone, data, _quick(SubjectSettings(rank=4, alignment_block=1), 3))
    ckpt = train_subject(backbone, data, _quick(SubjectSettings(rank=4, alignment_block=1,
                                                                gradient_checkpointing=True), 3))
    assert [r["loss"] for r in ckpt.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)
    assert all(not hasattr(b, "__dict__") or "forward" not in b.__dict__ for b in backbone.blocks)


@pytest.mark.parametrize("bad, match", [
    (lambda: SubjectSet(torch.zeros(0, 16, 1, 8, 8), torch.zeros(1, 5, 64)), "empty"),
    (lambda: SubjectSet(torch.zeros(3, 16, 1, 8, 8), torch.zeros(1, 5, 64), torch.zeros(2, 1, 1, 8, 8)), "masks"),
    (lambda: OptimSettings(steps=0), "steps"),
    (lambda: train_motion(describe(tiny_diffusers_wan()), VideoSet(torch.zeros(1, 16, 1, 8, 8), torch.zeros(1, 5, 64))),
     "motion clips"),
])
def test_bad_training_input_is_refused_with_the_input_named(bad, match):
    with pytest.raises(InputError, match=match):
        bad()


def test_token_attention_maps_sum_to_one_over_text_and_the_loss_follows_the_mask():
    from custvid_core.training.objectives import subject_token_attention, token_attention_loss

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    total = sum(subject_token_attention(q, k, 2, [t]) for t in range(3))
    assert torch.allclose(total, torch.ones(1, 4), atol=1e-5)
    mask = torch.zeros(1, 1, 1, 4, 4)
    mask[..., :2, :] = 1  # the top half of a 2x2 token grid
    right = torch.tensor([[0.99, 0.99, 0.01, 0.01]])
    assert token_attention_loss([right], mask, (1, 2, 2)) < token_attention_loss([1 - right], mask, (1, 2, 2))


def test_subject_training_with_token_attention_captures_every_block():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set(with_dino=False, preservation=False)
    data.subject_tokens = (0, 1)
    with backbone.capture_cross_attention([0, 1]) as attention:
        backbone.forward(data.latents[:1], 0.5, data.context)
    assert attention[1]["q"].shape == (1, 16, 32) and attention[1]["k"].shape == (1, 5, 32)
    assert attention[1]["heads"] == 2
    trained = train_subject(backbone, data, _quick(SubjectSettings(rank=4), 2))
    assert "token_attention" in trained.history[0] and trained.history[0]["token_attention"] > 0


def _world_decoded_flow(window=1):
    from custvid_core.representations.motion import build_raft
    from custvid_core.training.objectives import DecodedFlow
    from custvid_core.world.latent import TEMPORAL_FACTOR, decode

    torch.manual_seed(0)
    return DecodedFlow(decode, build_raft("raft_small"), DecodedFlow.grouped_frames(TEMPORAL_FACTOR), window=window,
                       iterations=2)


def test_decoded_flow_loss_is_zero_against_the_flow_of_the_same_frames_on_every_window():
    """Known answer: the reference is RAFT's flow of the decoded clip itself, so whichever latent window is
    drawn, its frames' flow matches the reference's slice exactly; another clip's flow does not."""
    from custvid_core.representations.motion import compute_flow
    from custvid_core.training.objectives import decoded_flow_loss
    from custvid_core.world.latent import decode, encode
    from custvid_core.world.scene import Scene, WorldSpec, render

    decoded = _world_decoded_flow(window=1)
    clip = render(Scene(direction="right", speed=2.0, start=(8.0, 16.0)), WorldSpec(frames=10))
    x0 = encode(clip.frames)  # 2 latent frames
    reference = compute_flow(decoded.raft, decode(x0)[0], iterations=2, progress=lambda *_: None)[None]
    other = torch.flip(reference, dims=[-1]) * -1 + 0.5
    for seed in range(4):  # both windows get drawn
        g = torch.Generator().manual_seed(seed)
        assert decoded_flow_loss(decoded, x0, reference, g).item() < 1e-5
        assert decoded_flow_loss(decoded, x0, other, torch.Generator().manual_seed(seed)).item() > 1e-3


def test_decoded_flow_loss_reaches_the_prediction_but_not_raft():
    from custvid_core.training.objectives import decoded_flow_loss

    decoded = _world_decoded_flow(window=1)
    x0 = (torch.rand(1, 16, 1, 32, 32) * 2 - 0.5).requires_grad_()
    loss = decoded_flow_loss(decoded, x0, torch.ones(1, 4, 2, 32, 32), torch.Generator().manual_seed(0))
    loss.backward()
    assert x0.grad is not None and x0.grad[:, :15].abs().sum() > 0
    assert all(p.grad is None for p in decoded.raft.model.parameters())


def test_causal_window_frames_follow_wan_vae_frame_counts():
    from custvid_core.training.objectives import DecodedFlow

    frames = DecodedFlow.causal_frames(4)
    assert frames(0, 3) == (0, 9)  # 3 latent frames decode to 1 + 4 * 2 frames
    assert frames(2, 5) == (8, 17)  # a window decoded alone: 9 frames, the last of latent frames 2..4


def test_motion_training_with_decoded_flow_alignment_trains_the_motion_lora_only():
    from custvid_core.world.latent import encode
    from custvid_core.world.model import DEFAULT_CONFIG, build_world
    from custvid_core.world.scene import Scene, WorldSpec, render

    world = build_world({**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64})
    clip = render(Scene(), WorldSpec())
    with torch.no_grad():
        context = world.text([clip.prompt])
    clips = VideoSet(encode(clip.frames), context, torch.zeros(1, 4, 2, 32, 32))
    decoded = _world_decoded_flow()
    settings = _quick(MotionSettings(rank=4, spatial_rank=0, alignment="decoded_flow"), 2)
    trained = train_motion(world.backbone, clips, settings, decoded_flow=decoded)
    assert all(r["alignment"] > 0 for r in trained.history)
    assert all(p.grad is None for p in decoded.raft.model.parameters())
    with pytest.raises(InputError, match="motion_alignment"):
        train_motion(world.backbone, clips, settings)  # no decoder given
    with pytest.raises(InputError, match="motion_alignment"):
        train_motion(world.backbone, clips, _quick(MotionSettings(rank=4, alignment="pixels"), 2))


def test_a_trigger_embedding_starts_at_the_prompt_and_learns_only_the_trigger_rows(tmp_path):
    from custvid_core.adapters.embedding import TriggerEmbedding, add_at

    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 5, 64, generator=g)
    assert torch.equal(TriggerEmbedding(2, 64)(context, (1, 3)), context)  # zero-initialised projection
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set(with_dino=False, preservation=False)
    data.subject_tokens = (1, 2)
    settings = _quick(SubjectSettings(rank=4, token_attention_weight=0.0, trigger_embedding=True), 4)
    trained = train_subject(backbone, data, settings, tmp_path / "run")
    assert trained.trigger_embedding.shape == (2, 64) and float(trained.trigger_embedding.abs().max()) > 0
    moved = add_at(context, data.subject_tokens, trained.trigger_embedding) - context
    assert torch.equal(moved[:, [0, 3, 4]], torch.zeros(2, 3, 64)) and bool((moved[:, [1, 2]] != 0).all())
    # The embedding is checkpointed with the LoRA: a rerun resumes the finished run and returns the same one.
    again = train_subject(backbone, data, settings, tmp_path / "run")
    assert torch.equal(again.trigger_embedding, trained.trigger_embedding)
    assert train_subject(backbone, data, _quick(SubjectSettings(rank=4), 1)).trigger_embedding is None


def test_a_trigger_embedding_needs_the_trigger_words_position():
    settings = _quick(SubjectSettings(rank=4, trigger_embedding=True), 1)
    with pytest.raises(InputError, match="trigger_embedding"):
        train_subject(describe(tiny_diffusers_wan()), _subject_set(with_dino=False, preservation=False), settings)


def test_a_region_margin_lets_the_region_loss_see_the_outline():
    from custvid_core.training.objectives import widened

    mask = torch.zeros(1, 1, 1, 8, 8)
    mask[..., 3:5, 3:5] = 1
    grown = widened(mask, 1)
    assert int(grown.sum()) == 16 and bool(grown[..., 2:6, 2:6].all()) and torch.equal(widened(mask, 0), mask)
    # An error just outside the subject (where a blob fills a star's notches) counts only with the margin.
    target = torch.zeros(1, 16, 1, 8, 8)
    pred = target.clone()
    pred[..., 2, 3] = 1.0
    assert float(region_loss(pred, target, mask)) == 0 and float(region_loss(pred, target, grown)) > 0
    with pytest.raises(InputError, match="region_margin"):
        train_subject(describe(tiny_diffusers_wan()), _subject_set(),
                      _quick(SubjectSettings(rank=4, alignment_block=1, region_margin=-1)))


def _with_moving(data: SubjectSet, seed: int) -> SubjectSet:
    """`data` with four moving clips of two latent frames (as Wan encodes a 5-frame clip), masks on both."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(4, 1, 2, 8, 8)
    masks[..., 1:5, 2:6] = 1
    return replace(data, moving=MovingClips(torch.randn(4, 16, 2, 8, 8, generator=g), data.context, masks))


def test_moving_clips_take_their_share_of_the_photo_steps():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set(preservation=False)
    data.subject_tokens = (1,)

    def lora(d, share):
        settings = _quick(SubjectSettings(rank=4, alignment_block=1, moving_share=share), 6)
        return train_subject(backbone, d, settings)

    def other_photos(d):
        from dataclasses import replace
        return replace(d, latents=torch.randn(d.latents.shape, generator=torch.Generator().manual_seed(9)))

    # All photo steps on the moving clips: the photos themselves make no difference; none on them: the clips don't.
    only_moving = lora(_with_moving(data, 1), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(only_moving.tensors.values(),
                                                  lora(other_photos(_with_moving(data, 1)), 1.0).tensors.values()))
    assert not any("alignment" in r for r in only_moving.history)  # the DINOv2 features are the photos'
    assert all("token_attention" in r for r in only_moving.history)  # the clips' own masks
    no_moving = lora(_with_moving(data, 1), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(no_moving.tensors.values(),
                                                  lora(_with_moving(data, 2), 0.0).tensors.values()))
    assert not all(torch.equal(a, b) for a, b in zip(no_moving.tensors.values(), only_moving.tensors.values()))
    half = lora(_with_moving(data, 1), 0.5)
    assert 0 < sum("alignment" in r for r in half.history) < len(half.history)
    with pytest.raises(InputError, match="moving_share"):
        lora(_with_moving(data, 1), 1.5)
    with pytest.raises(InputError, match="moving_clips"):
        SubjectSet(data.latents, data.context, moving=SubjectSet(data.latents, torch.zeros(1, 5, 32)))


def test_a_run_leaves_the_global_random_generator_as_it_was():
    backbone = describe(tiny_diffusers_wan())
    data = _subject_set()
    data.subject_tokens = (0, 1)
    state = torch.random.get_rng_state()
    trained = train_subject(backbone, data, _quick(SubjectSettings(rank=4, alignment_block=1, trigger_embedding=True), 2))
    assert "alignment" in trained.history[0] and trained.trigger_embedding is not None
    assert torch.equal(torch.random.get_rng_state(), state)


def test_phase_schedules_pick_tasks_by_the_global_step_and_draw_only_where_they_choose_at_random():
    from custvid_core.training.tasks import Cycle, Random, Stages, Task, task_at, tasks_in

    a, b, c, d = (Task(n, lambda g, run: None, (n,)) for n in "abcd")
    cycle = Cycle([a, b, c])
    g = torch.Generator().manual_seed(0)
    assert [task_at(cycle, i, g).name for i in range(7)] == list("abcabca")
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # a cycle draws nothing
    # Random draws one number per step, and runs the first choice whose running sum passes it.
    joint = Random([(0.3, d), (0.7, cycle)])
    g, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i in range(40):
        expected = d if float(torch.rand((), generator=twin)) < 0.3 else [a, b, c][i % 3]  # the cycle's own phase
        assert task_at(joint, i, g) is expected
    stages = Stages([(2, a), (3, Cycle([b, c])), (1, d)])
    assert [task_at(stages, i, g).name for i in range(8)] == list("aabcbddd")
    assert list(tasks_in(Random([(0.5, stages), (0.5, cycle)]))) == [a, b, c, d, a, b, c]
    with pytest.raises(InputError, match="probabilities"):
        Random([(0.3, a), (0.3, b)])


def test_a_group_learning_rate_factor_scales_that_groups_steps_and_enters_the_fingerprint_only_when_set():
    from custvid_core.training.loop import StepResult, _fingerprint, train

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    settings = OptimSettings(steps=1, lr=0.1, warmup=0, schedule="constant", weight_decay=0.0,
                             lr_factors=(("b", 0.01),))
    train(lambda i, g: StepResult((a + b).sum()), {"a": [a], "b": [b]}, settings)
    # Adam's first step moves each weight by its learning rate.
    assert torch.allclose(a.detach(), torch.full((3,), -0.1)) and torch.allclose(b.detach(), torch.full((3,), -0.001))
    with pytest.raises(InputError, match="lr_factors: unknown groups \\['c'\\]"):
        train(lambda i, g: StepResult(a.sum()), {"a": [a]}, replace(settings, lr_factors=(("c", 0.5),)))
    with pytest.raises(InputError, match="lr_factors"):
        OptimSettings(lr_factors=(("a", 0.0),))
    groups = {"a": [a]}
    assert "lr_factors" not in _fingerprint(groups, OptimSettings(), None)["settings"]  # older checkpoints resume
    assert "lr_factors" in _fingerprint(groups, OptimSettings(lr_factors=(("a", 0.5),)), None)["settings"]
