import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters import LoraAdapters, LoraSpec, motion_lora, read_lora, save_lora, subject_lora
from custvid_core.backbones import describe
from custvid_core.errors import InputError


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g)


def _randomise(adapters, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_adapters_attach_by_role_and_detach_without_a_trace():
    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    before = backbone.forward(x, 0.5, ctx)
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    with LoraAdapters(backbone, [subject_lora(4), motion_lora(8)]) as adapters:
        # Fresh LoRAs start as the identity (lora_up is zero).
        assert torch.allclose(backbone.forward(x, 0.5, ctx), before, atol=1e-6)
        # ffn.0 carries both adapters; q only the subject one.
        ffn0 = backbone.model.get_submodule(backbone.module_path(0, "ffn.0"))
        q = backbone.model.get_submodule(backbone.module_path(1, "self_attn.q"))
        assert set(ffn0.lora_A) == {"subject", "motion"} and set(q.lora_A) == {"subject"}
        assert all(p.requires_grad for p in adapters.parameters("motion"))
        assert not any(p.requires_grad for n, p in backbone.model.named_parameters() if "lora_" not in n)
        _randomise(adapters, "subject")
        changed = backbone.forward(x, 0.5, ctx)
        assert (changed - before).abs().max() > 1e-3
        with adapters.strengths_set(subject=0.0):
            assert torch.allclose(backbone.forward(x, 0.5, ctx), before, atol=1e-6)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), changed)
    assert not any("lora" in n for n, _ in backbone.model.named_modules())
    assert not hasattr(backbone.model, "peft_config")
    after = backbone.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.allclose(backbone.forward(x, 0.5, ctx), before)


def test_native_form_has_comfyui_names_and_round_trips(tmp_path):
    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    with LoraAdapters(backbone, [subject_lora(4)]) as adapters:
        _randomise(adapters, "subject")
        expected = backbone.forward(x, 0.5, ctx)
        path = save_lora(tmp_path / "subject.safetensors", adapters.native_state_dict("subject"),
                         adapters.specs["subject"], backbone, {"steps": 3})
        sd = adapters.native_state_dict("subject")
    # 2 blocks x 5 roles x (down, up, alpha)
    assert len(sd) == 30
    assert sd["diffusion_model.blocks.1.cross_attn.k.lora_down.weight"].shape == (4, 32)
    assert sd["diffusion_model.blocks.1.ffn.0.lora_up.weight"].shape == (64, 4)
    tensors, spec, meta = read_lora(path)
    assert spec == subject_lora(4) and meta["custvid.lora.info"] == {"steps": 3}
    with LoraAdapters(backbone, [spec]) as adapters:
        adapters.load_native_state_dict("subject", tensors)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), expected, atol=1e-6)


def test_lora_of_another_size_or_layout_is_refused():
    backbone = describe(tiny_diffusers_wan())
    with LoraAdapters(backbone, [subject_lora(4)]) as adapters:
        sd = adapters.native_state_dict("subject")
    with LoraAdapters(backbone, [subject_lora(8)]) as adapters:
        with pytest.raises(InputError, match="rank 8"):
            adapters.load_native_state_dict("subject", sd)
    with LoraAdapters(backbone, [motion_lora(4)]) as adapters:
        with pytest.raises(InputError, match="lacks"):
            adapters.load_native_state_dict("motion", sd)


def test_bad_specs_are_refused_with_the_input_named():
    with pytest.raises(InputError, match="roles"):
        LoraSpec("subject", ("self_attn.x",), 4)
    with pytest.raises(InputError, match="rank"):
        LoraSpec("subject", ("self_attn.q",), 0)
    backbone = describe(tiny_diffusers_wan())
    with pytest.raises(InputError, match="block"):
        LoraAdapters(backbone, [LoraSpec("s", ("self_attn.q",), 2, blocks=(5,))])
    assert not any("lora" in n for n, _ in backbone.model.named_modules())


def test_a_trigger_embedding_file_keeps_its_words_and_other_files_are_refused(tmp_path):
    from custvid_core.adapters.embedding import LearnedTrigger, load_trigger_embedding, save_trigger_embedding
    from custvid_core.files import save_safetensors

    learned = LearnedTrigger(torch.randn(2, 8), "sks dog")
    save_trigger_embedding(tmp_path / "dog.safetensors", learned)
    loaded = load_trigger_embedding(tmp_path / "dog.safetensors")
    assert torch.equal(loaded.residual, learned.residual) and loaded.trigger_words == "sks dog"
    save_safetensors(tmp_path / "lora.safetensors", {"a.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(InputError, match="trigger_embedding: 'lora.safetensors' is not a CustVid trigger embedding"):
        load_trigger_embedding(tmp_path / "lora.safetensors")


def test_lora_parts_share_one_injection_take_every_kind_of_strength_and_export_native_keys():
    from custvid_core.adapters.lora import LoraPart
    from custvid_core.adapters.parts import Part, attached

    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    before = backbone.forward(x, 0.5, ctx)
    subject, motion = LoraPart(subject_lora(4)), LoraPart(motion_lora(8))
    assert isinstance(subject, Part)
    with attached(backbone, [subject, motion]):
        assert subject.adapters is motion.adapters  # one peft injection: ffn.0 carries both
        assert set(backbone.model.get_submodule(backbone.module_path(0, "ffn.0")).lora_A) == {"subject", "motion"}
        assert list(subject.groups()) == ["subject"] and len(subject.groups()["subject"]) == 2 * 2 * 5
        _randomise(subject.adapters, "subject")
        full = backbone.forward(x, 0.5, ctx)
        # A per-block tensor: block 0 off, block 1 at full strength; gradients reach the tensor.
        weights = torch.tensor([0.0, 1.0], requires_grad=True)
        subject.set_strength(weights)
        per_block = backbone.forward(x, 0.5, ctx)
        per_block.square().sum().backward()
        assert weights.grad is not None and weights.grad.abs().min() > 0
        subject.set_strength(torch.tensor(1.0))
        assert torch.allclose(backbone.forward(x, 0.5, ctx), full, atol=1e-6)
        assert not torch.allclose(per_block, full, atol=1e-4) and not torch.allclose(per_block, before, atol=1e-4)
        # A function of the sampling progress, resolved when the progress is given.
        subject.set_strength(lambda progress: 1.0 - progress)
        subject.at_progress(1.0)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), before, atol=1e-6)
        subject.at_progress(0.0)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), full, atol=1e-6)
        exported = subject.export()
        assert exported.kind == "lora" and exported.metadata["spec"]["rank"] == 4
        assert exported.tensors.keys() == subject.adapters.native_state_dict("subject").keys()
        assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in exported.tensors
        with pytest.raises(InputError, match="strength"):
            subject.set_strength(torch.ones(3))
    assert subject.adapters is None
    assert not any("lora" in n for n, _ in backbone.model.named_modules())
    assert torch.equal(backbone.forward(x, 0.5, ctx), before)


def test_initial_weights_come_from_the_seed_alone_and_leave_the_global_generator_alone():
    from custvid_core.adapters.embedding import TriggerEmbeddingPart
    from custvid_core.adapters.parts import ProjectorPart, attached

    backbone = describe(tiny_diffusers_wan())

    def initial(seed):
        parts = [ProjectorPart("p", backbone.dim, 3, 16, seed), TriggerEmbeddingPart("e", (1,), 64, "sks", seed)]
        with LoraAdapters(backbone, [subject_lora(4)], seed=seed) as adapters, attached(backbone, parts):
            return [p.detach().clone() for p in adapters.parameters("subject")] + \
                [p.detach().clone() for part in parts for ps in part.groups().values() for p in ps]

    state = torch.random.get_rng_state()
    first = initial(3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(5)  # whatever else draws from the global generator changes nothing
    assert all(torch.equal(a, b) for a, b in zip(first, initial(3)))
    assert not all(torch.equal(a, b) for a, b in zip(first, initial(4)))


def test_a_trigger_embedding_part_edits_its_rows_by_its_strength_and_a_projector_exports_nothing():
    from custvid_core.adapters.embedding import KIND, TriggerEmbeddingPart, add_at
    from custvid_core.adapters.parts import ProjectorPart, attached

    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    before = backbone.forward(x, 0.5, ctx)
    part, projector = TriggerEmbeddingPart("trigger", (1, 3), 64, "sks"), ProjectorPart("projector", 32, 2, 8)
    with attached(backbone, [part, projector]):
        with torch.no_grad():
            part.module.project.weight.normal_()
        residual = part.module.residual().detach()
        part.set_strength(0.0)
        assert torch.equal(backbone.forward(x, 0.5, ctx), before)
        learned = backbone.forward(x, 0.5, add_at(ctx, (1, 3), residual))  # by hand, with the part off
        half = backbone.forward(x, 0.5, add_at(ctx, (1, 3), 0.5 * residual))
        assert not torch.allclose(learned, before, atol=1e-4)
        part.set_strength(1.0)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), learned, atol=1e-5)
        part.set_strength(0.5)
        assert torch.allclose(backbone.forward(x, 0.5, ctx), half, atol=1e-5)
        exported = part.export()
        assert exported.kind == KIND and torch.equal(exported.tensors[KIND], residual)
        assert exported.metadata == {"trigger_words": "sks"}
        assert projector.export() is None and len(projector.groups()["projector"]) == 6
    assert torch.equal(backbone.forward(x, 0.5, ctx), before)
    assert not any(m._forward_pre_hooks for m in backbone.model.modules())


def test_synmotion_motion_preset_puts_lora_on_q_k_v_of_every_attention_layer_and_nothing_else():
    from custvid_core.adapters import synmotion_motion_lora

    backbone = describe(tiny_diffusers_wan())
    x, ctx = _inputs()
    with LoraAdapters(backbone, [synmotion_motion_lora(4)]) as adapters:
        on = {name.removeprefix("diffusion_model.").rsplit(".lora_down.weight", 1)[0]
              for name in adapters.native_state_dict("motion") if name.endswith(".lora_down.weight")}
        assert on == {f"blocks.{b}.{a}.{p}" for b in range(2) for a in ("self_attn", "cross_attn") for p in "qkv"}
        before = backbone.forward(x, 0.5, ctx)
        _randomise(adapters, "motion")
        assert (backbone.forward(x, 0.5, ctx) - before).abs().max() > 1e-3
    assert synmotion_motion_lora().rank == 64 and synmotion_motion_lora().name == "motion"
