"""SynMotion's dual embeddings: the part, its groups, applying trained ones to any prompt, and their file."""

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters.parts import attached
from custvid_core.adapters.synmotion import (
    KIND,
    LearnedSynMotion,
    RolePositions,
    SynMotionEmbeddingPart,
    load_synmotion,
    save_synmotion,
    with_embeddings,
)
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training.loop import OptimSettings, StepResult, train

TEXT_DIM = 64
POSITIONS = RolePositions(subject=(1, 2), motion=(3, 4, 5))


def _inputs(seed=0, length=8, width=TEXT_DIM):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, length, width, generator=g)


def _part(refiner=True, phrase=None, seed=0):
    phrase = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(9)) if phrase is None else phrase
    return SynMotionEmbeddingPart("syn", POSITIONS, TEXT_DIM, phrase, "red circle", "moving left", refiner, seed)


def _trained(part):
    """Give the attached part's zero-initialised layers values, as training would."""
    g = torch.Generator().manual_seed(5)
    m = part.module
    with torch.no_grad():
        for layer in (m.subject.project, m.motion.project, *((m.refiner.out,) if m.refiner is not None else ())):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_at_first_the_context_is_the_text_encoders_and_detaching_leaves_no_trace():
    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    before = backbone.forward(x, 0.5, ctx)
    part = _part()
    with attached(backbone, [part]):
        assert torch.equal(part._edit(ctx), ctx)
        assert torch.equal(backbone.forward(x, 0.5, ctx), before)
        _trained(part)
        assert not torch.allclose(backbone.forward(x, 0.5, ctx), before, atol=1e-4)
        part.set_strength(0.0)
        assert torch.equal(backbone.forward(x, 0.5, ctx), before)
    assert not any(m._forward_pre_hooks for m in backbone.model.modules())
    assert torch.equal(backbone.forward(x, 0.5, ctx), before)


def test_the_motion_code_starts_at_the_pooled_phrase_and_the_subject_code_at_its_seed():
    phrase = torch.randn(3, TEXT_DIM)
    backbone = describe(tiny_diffusers_wan())
    first, other = _part(phrase=phrase, seed=1), _part(phrase=phrase, seed=2)
    with attached(backbone, [first, other]):
        assert torch.allclose(first.module.motion.code, phrase.mean(0).expand(3, -1))
        assert torch.equal(first.module.motion.code, other.module.motion.code)
        assert not torch.equal(first.module.subject.code, other.module.subject.code)
    padded = torch.zeros(1, 12, TEXT_DIM)  # as an encoder pads it: the padding is not part of the phrase
    padded[0, :3] = phrase
    assert torch.allclose(_part(phrase=padded).phrase, phrase.mean(0))
    with pytest.raises(InputError, match="motion_phrase: a tensor of shape \\(2, 65\\)"):
        _part(phrase=torch.randn(2, TEXT_DIM + 1))
    with pytest.raises(InputError, match="motion_phrase: a tensor of shape \\(1, 12, 64\\) with only zero rows"):
        _part(phrase=torch.zeros(1, 12, TEXT_DIM))


def test_each_group_gets_only_its_own_gradient_and_the_refiner_learns_with_the_motion():
    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    part = _part()
    with attached(backbone, [part]):
        groups = part.groups()
        assert set(groups) == {"syn_subject", "syn_motion"}
        refiner_ids = {id(p) for p in part.module.refiner.parameters()}
        assert refiner_ids <= {id(p) for p in groups["syn_motion"]}
        for trained, frozen in (("syn_subject", "syn_motion"), ("syn_motion", "syn_subject")):
            start = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}

            def step(i, g, trained=trained):
                return StepResult(backbone.forward(x, 0.5, ctx).pow(2).mean(), update=(trained,))

            train(step, groups, OptimSettings(steps=2, lr=1e-2, warmup=0))
            assert all(torch.equal(p, s) for p, s in zip(groups[frozen], start[frozen]))
            assert any(not torch.equal(p, s) for p, s in zip(groups[trained], start[trained]))
        # A step on a prompt with no motion words (a prior clip's) edits its subject rows alone.
        part.set_positions(RolePositions(subject=(6,)))
        edited = part._edit(ctx)
        assert torch.equal(edited[:, :6], ctx[:, :6]) and not torch.equal(edited[:, 6], ctx[:, 6])


def test_without_the_refiner_only_the_residuals_are_added():
    backbone = describe(tiny_diffusers_wan())
    _, ctx = _inputs()
    part = _part(refiner=False)
    with attached(backbone, [part]):
        assert part.module.refiner is None and len(part.groups()["syn_motion"]) == 2
        _trained(part)
        m = part.module
        by_hand = ctx.clone()
        by_hand[:, [1, 2]] += m.subject.residual().detach()
        by_hand[:, [3, 4, 5]] += m.motion.residual().detach()
        assert torch.allclose(part._edit(ctx).detach(), by_hand)
        learned = part.learned()
    assert learned.refiner is None and learned.exported().metadata["refiner"] is False
    assert torch.allclose(with_embeddings(ctx, POSITIONS, learned, subject=True), by_hand)


def test_trained_embeddings_apply_to_a_new_subject_prompt_as_in_training(tmp_path):
    backbone = describe(tiny_diffusers_wan())
    _, ctx = _inputs()
    part = _part()
    with attached(backbone, [part]):
        _trained(part)
        in_training = part._edit(ctx).detach()
        part.set_positions(RolePositions(motion=POSITIONS.motion))
        motion_only = part._edit(ctx).detach()
        learned = part.learned()
    assert torch.allclose(with_embeddings(ctx, POSITIONS, learned, subject=True), in_training, atol=1e-6)
    # A new subject: its rows are left as its words give them; the motion rows get residual and refiner.
    new_subject = with_embeddings(ctx, POSITIONS, learned)
    assert torch.allclose(new_subject, motion_only, atol=1e-6)
    assert torch.equal(new_subject[:, :3], ctx[:, :3]) and not torch.allclose(new_subject[:, 3:6], ctx[:, 3:6])
    assert torch.equal(new_subject[:, 6:], ctx[:, 6:])
    assert torch.allclose(with_embeddings(ctx, POSITIONS, learned, strength=0.0), ctx)

    path = save_synmotion(tmp_path / "motion.safetensors", learned)
    back = load_synmotion(path, text_dim=TEXT_DIM)
    assert (back.subject_words, back.motion_words, back.subject_tokens) == ("red circle", "moving left", 2)
    assert torch.equal(back.motion_residual, learned.motion_residual)
    assert back.refiner.keys() == learned.refiner.keys()
    assert torch.equal(with_embeddings(ctx, POSITIONS, back, subject=True), with_embeddings(ctx, POSITIONS, learned,
                                                                                            subject=True))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["custvid.kind"] == KIND and meta["custvid.text_dim"] == "64" and meta["custvid.motion_tokens"] == "3"
    assert meta["custvid.refiner"] == "true" and not list(tmp_path.glob(".*tmp"))


def test_applied_embeddings_carry_no_autograd_graph():
    """Conditioning for sampling: a sampler running without no_grad would otherwise chain each step's graph through
    the refiner's weights (and keep them all)."""
    backbone = describe(tiny_diffusers_wan())
    _, ctx = _inputs()
    part = _part()
    with attached(backbone, [part]):
        _trained(part)
        learned = part.learned()
    out = with_embeddings(ctx, POSITIONS, learned, subject=True)
    assert not out.requires_grad and out.grad_fn is None
    assert not torch.equal(out, ctx)


def _learned(width=TEXT_DIM, motion_tokens=3):
    return LearnedSynMotion(torch.randn(1, width), torch.randn(motion_tokens, width), None, "red circle", "moving left", 2)


def test_other_files_widths_and_prompts_are_refused_naming_the_input(tmp_path):
    from custvid_core.adapters.embedding import LearnedTrigger, save_trigger_embedding

    save_trigger_embedding(tmp_path / "trigger.safetensors", LearnedTrigger(torch.randn(2, TEXT_DIM), "sks"))
    with pytest.raises(InputError, match="synmotion_embeddings: 'trigger.safetensors' is not a CustVid SynMotion"):
        load_synmotion(tmp_path / "trigger.safetensors")
    save_synmotion(tmp_path / "wide.safetensors", _learned(width=128))
    with pytest.raises(InputError, match="synmotion_embeddings: embeddings of width 128 for a text encoder of width 64"):
        load_synmotion(tmp_path / "wide.safetensors", text_dim=TEXT_DIM)
    from custvid_core.files import save_safetensors
    tensors = _learned().exported().tensors
    save_safetensors(tmp_path / "damaged.safetensors", tensors, {"custvid.kind": KIND, "custvid.text_dim": "{"})
    with pytest.raises(InputError, match="synmotion_embeddings: 'damaged.safetensors' has damaged metadata"):
        load_synmotion(tmp_path / "damaged.safetensors")
    save_safetensors(tmp_path / "odd.safetensors", {**tensors, "refiner.extra": torch.zeros(2)}, {"custvid.kind": KIND})
    with pytest.raises(InputError, match="synmotion_embeddings: refiner weights \\['extra'\\]"):
        load_synmotion(tmp_path / "odd.safetensors")
    _, ctx = _inputs()
    with pytest.raises(InputError, match="synmotion_embeddings: width 128 on conditioning of width 64"):
        with_embeddings(ctx, POSITIONS, _learned(width=128))
    with pytest.raises(InputError, match="motion_words: 2 motion tokens in the prompt, the embedding was learned on 3"):
        with_embeddings(ctx, RolePositions(motion=(3, 4)), _learned())
    with pytest.raises(InputError, match="motion_words: no motion token found"):
        with_embeddings(ctx, RolePositions(subject=(1,)), _learned())
    with pytest.raises(InputError, match="motion_words: positions \\[3\\] are both"):
        RolePositions(subject=(1, 3), motion=(3, 4))
    with pytest.raises(InputError, match="synmotion_embeddings: positions \\[7, 8, 9\\] in a conditioning of 8 rows"):
        with_embeddings(ctx, RolePositions(motion=(7, 8, 9)), _learned())


def test_umt5_shaped_padded_conditioning_keeps_its_padding_and_works_in_bf16():
    """Wan's umt5 conditioning: 4096 wide, 512 rows, zeros after the prompt. Only the words' rows change."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.zeros(2, 512, 4096)
    ctx[:, :7] = torch.randn(2, 7, 4096, generator=g) * 0.2
    phrase = torch.zeros(1, 512, 4096)  # the motion phrase encoded alone, padded as the prompt is
    phrase[0, :3] = ctx[0, 3:6]
    part = SynMotionEmbeddingPart("syn", POSITIONS, 4096, phrase, "red circle", "moving left")
    assert torch.allclose(part.phrase, ctx[0, 3:6].mean(0))
    backbone = describe(tiny_diffusers_wan())  # only its text hook is used here
    with attached(backbone, [part]):
        assert part.module.motion.project.weight.shape == (4096, 4096)
        assert torch.equal(part._edit(ctx), ctx)
        _trained(part)
        learned = part.learned()
    out = with_embeddings(ctx, POSITIONS, learned)
    assert out.shape == ctx.shape and torch.equal(out[:, 7:], ctx[:, 7:]) and torch.equal(out[:, :3], ctx[:, :3])
    assert not torch.allclose(out[:, 3:6], ctx[:, 3:6])
    half = with_embeddings(ctx.bfloat16(), POSITIONS, learned)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), out, atol=0.1, rtol=0.05)


def test_the_shapes_worlds_conditioning_takes_the_words_positions_from_its_tokenizer():
    from custvid_core.world.text import WorldTextEncoder

    text = WorldTextEncoder()
    prompt = "a red circle moving left"
    roles = text.token_roles(prompt, "red circle")
    motion = text.token_roles(prompt, "moving left").subject
    positions = RolePositions(roles.subject, motion)
    assert positions == RolePositions((1, 2), (3, 4))
    ctx = text(prompt).detach()
    part = SynMotionEmbeddingPart("syn", positions, ctx.shape[-1], text("moving left").detach())
    backbone = describe(tiny_diffusers_wan())
    with attached(backbone, [part]):
        _trained(part)
        learned = part.learned()
    # The same motion on a subject the clips never showed.
    other = text("a blue square moving left").detach()
    out = with_embeddings(other, RolePositions(text.token_roles("a blue square moving left", "blue square").subject,
                                               motion), learned)
    assert torch.equal(out[:, :3], other[:, :3]) and torch.equal(out[:, 5:], other[:, 5:])
    assert not torch.allclose(out[:, 3:5], other[:, 3:5])


def test_in_a_training_run_prior_clip_steps_train_the_subject_alone_on_their_own_prompts():
    """SynMotion's alternation through the engine: motion steps (the clips' prompt) train both groups, prior-clip
    steps (another subject, no motion words) only the subject's; the run exports what `with_embeddings` applies."""
    from custvid_core.training import engine
    from custvid_core.training.tasks import Random, Recipe, Task

    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    part = _part()
    seen = []

    def loss_at(positions):
        def loss(g, step):
            part.set_positions(positions)
            seen.append(positions)
            return backbone.forward(x, 0.5, ctx).pow(2).mean(), {}
        return loss

    motion = Task("motion", loss_at(POSITIONS), ("syn_subject", "syn_motion"))
    prior = Task("prior", loss_at(RolePositions(subject=(6,))), ("syn_subject",))

    def trained(schedule):
        recipe = Recipe("synmotion", [part], schedule, ("syn",))
        (result,) = engine.run(backbone, [recipe], schedule, OptimSettings(steps=4, lr=1e-2, warmup=0))
        return LearnedSynMotion.from_exported(result.parts["syn"])

    only_prior = trained(prior)
    assert only_prior.motion_residual.abs().max() == 0 and only_prior.subject_residual.abs().max() > 0
    assert only_prior.subject_tokens == 2  # the training prompt's, whatever the steps' prompts were
    both = trained(Random([(0.75, motion), (0.25, prior)]))
    assert both.motion_residual.abs().max() > 0 and {POSITIONS, RolePositions(subject=(6,))} <= set(seen)
    assert not torch.equal(with_embeddings(ctx, POSITIONS, both), ctx)
