"""The Wan description on ComfyUI's own WanModel (imported in-process from COMFYUI_PATH)."""

import pytest
import torch
from comfy_host import import_comfy, import_pack

from custvid_core.backbones import ROLES, describe, diffusers_to_native_key

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=48, freq_dim=32, in_dim=16, out_dim=16)


def comfy_wan(device=None, **config):
    import_comfy()
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel(model_type="t2v", patch_size=(1, 2, 2), cross_attn_norm=True, eps=1e-6,
                                        device=device, operations=comfy.ops.disable_weight_init, **config)


def tiny_pair():
    """The same random weights in ComfyUI's WanModel and in diffusers' WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=TINY["num_heads"],
                                   attention_head_dim=TINY["dim"] // TINY["num_heads"], in_channels=16,
                                   out_channels=16, text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"],
                                   ffn_dim=TINY["ffn_dim"], num_layers=TINY["num_layers"], cross_attn_norm=True,
                                   qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    with torch.no_grad():  # diffusers zero-initialises the modulation tables; make them matter
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    native = comfy_wan(**TINY).eval()
    sd = {diffusers_to_native_key(k): v for k, v in theirs.state_dict().items()}
    missing, unexpected = native.load_state_dict(sd, strict=False)
    assert not unexpected and all("rope" in k for k in missing), (missing, unexpected)
    return describe(native), describe(theirs)


def test_native_forward_capture_roles_and_names():
    native, _ = tiny_pair()
    assert native.implementation == "comfyui"
    x, context = torch.randn(2, 16, 3, 8, 10), torch.randn(2, 7, TINY["text_dim"])
    with native.capture(1) as hidden:
        v = native.forward(x, torch.tensor([0.2, 0.7]), context)
    assert v.shape == x.shape and hidden[1].shape == (2, 3 * 4 * 5, TINY["dim"])
    assert native.token_grid(x.shape) == (3, 4, 5)
    assert native.role_module(1, "ffn.2") is native.model.blocks[1].ffn[2]
    assert native.module_path(0, "cross_attn.o") == "blocks.0.cross_attn.o"
    assert [n for n, _ in native.role_modules(blocks=[0])] == [f"diffusion_model.blocks.0.{r}" for r in ROLES]


def test_native_and_diffusers_descriptions_agree():
    native, theirs = tiny_pair()
    x, context = torch.randn(1, 16, 2, 6, 8), torch.randn(1, 5, TINY["text_dim"])
    with torch.no_grad(), native.capture(0) as h_native, theirs.capture(0) as h_theirs:
        v_native = native.forward(x, 0.4, context)
        v_theirs = theirs.forward(x, 0.4, context)
    assert torch.allclose(h_native[0], h_theirs[0], atol=1e-4)
    assert torch.allclose(v_native, v_theirs, atol=1e-4)
    for (name_a, mod_a), (name_b, mod_b) in zip(native.role_modules(), theirs.role_modules()):
        assert name_a == name_b and torch.equal(mod_a.weight, mod_b.weight)


@pytest.mark.parametrize("config, keys", [
    (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), 825),
    (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), 1095),
])
def test_real_wan21_configs_on_the_meta_device(config, keys):
    from diffusers import WanTransformer3DModel

    native = comfy_wan(device="meta", **config)
    backbone = describe(native)
    native_shapes = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    assert len(native_shapes) == keys
    for name, module in backbone.role_modules():
        assert native_shapes[name.removeprefix("diffusion_model.") + ".weight"] == tuple(module.weight.shape)
    with torch.device("meta"):
        theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=config["num_heads"],
                                       attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                                       freq_dim=256, ffn_dim=config["ffn_dim"], num_layers=config["num_layers"],
                                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    converted = {diffusers_to_native_key(k): tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert converted == native_shapes


def test_cross_attention_capture_agrees_between_implementations():
    native, theirs = tiny_pair()
    x, context = torch.randn(1, 16, 2, 6, 8), torch.randn(1, 5, TINY["text_dim"])
    with torch.no_grad(), native.capture_cross_attention([1]) as a_native, \
            theirs.capture_cross_attention([1]) as a_theirs:
        native.forward(x, 0.4, context)
        theirs.forward(x, 0.4, context)
    assert a_native[1]["heads"] == a_theirs[1]["heads"] == TINY["num_heads"]
    assert a_native[1]["q"].shape == (1, 2 * 3 * 4, TINY["dim"]) and a_native[1]["k"].shape == (1, 5, TINY["dim"])
    for name in ("q", "k"):
        assert torch.allclose(a_native[1][name], a_theirs[1][name], atol=1e-4)


@pytest.mark.parametrize("site", ["self_attn", "ffn"])
def test_a_residual_beside_a_sublayer_of_comfyuis_wan_adds_gate_times_f_of_its_input_and_leaves_no_trace(site):
    from builders import residual_effect

    native, _ = tiny_pair()
    x, context = torch.randn(1, 16, 2, 6, 8), torch.randn(1, 5, TINY["text_dim"])
    before = native.forward(x, 0.4, context)

    def chunks(block, args, kwargs):  # as WanAttentionBlock.forward splits them
        e = kwargs["e"]
        return (block.modulation + e).chunk(6, dim=1) if e.ndim < 4 else (block.modulation.unsqueeze(0) + e).unbind(2)

    change, expected = residual_effect(native, 1, site, x, 0.4, context, "norm3", chunks)
    assert expected.abs().max() > 1e-2
    assert torch.allclose(change, expected, atol=1e-5)
    assert torch.equal(native.forward(x, 0.4, context), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in native.model.modules())


def test_before_blocks_gives_the_same_embedded_inputs_in_both_implementations():
    native, theirs = tiny_pair()
    x, context = torch.randn(2, 16, 2, 6, 8), torch.randn(2, 5, TINY["text_dim"])
    seen = {}
    for backbone in (native, theirs):
        with torch.no_grad(), backbone.before_blocks(lambda inputs, b=backbone: seen.__setitem__(b, inputs)):
            backbone.forward(x, torch.tensor([0.3, 0.8]), context)
    a, b = seen[native], seen[theirs]
    assert a.video.shape == (2, 2 * 3 * 4, TINY["dim"]) and a.text.shape == (2, 5, TINY["dim"])
    assert a.time.shape == (2, TINY["dim"]) and not torch.allclose(a.time[0], a.time[1])
    for name in ("video", "text", "time"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in native.model.modules())


def test_dualreal_adapters_and_controller_on_comfyuis_wan_act_as_on_diffusers_and_learn():
    from custvid_core.adapters.dualreal import DualAdapterPart, DualAdapterSpec, DualRealWeights
    from custvid_core.adapters.parts import attached
    from custvid_core.adapters.stage_blender import StageBlenderPart, dualreal_parts

    import_pack().nodes.host.enable_rope_backward()  # as the pack's training does, for comfy-kitchen's fused RoPE
    native, theirs = tiny_pair()
    x, context = torch.randn(2, 16, 2, 6, 8), torch.randn(2, 5, TINY["text_dim"])
    identity = DualAdapterPart("dualreal_identity", "identity", DualAdapterSpec(8))
    motion = DualAdapterPart("dualreal_motion", "motion", DualAdapterSpec(8, condition_dim=12))
    controller = StageBlenderPart("dualreal_controller", identity, motion, groups=2)
    parts = [identity, motion, controller]
    c = torch.randn(1, 12)
    plain = native.forward(x, 0.4, context)
    with attached(native, parts):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # trained-looking weights: every adapter and the controller's last layer non-zero
            for part in parts:
                for p in part.module.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        motion.set_condition(c)
        v_native = native.forward(x, torch.tensor([0.3, 0.8]), context)
        v_native.square().mean().backward()
        assert controller.module.tokens.weight.grad.abs().max() > 0
        weights_native = identity.block_weights.detach()
        exported = DualRealWeights({role: p.export() for role, p in zip(("identity", "motion", "controller"), parts)})
    assert not torch.allclose(v_native, plain, atol=1e-3)
    assert weights_native.shape == (2, TINY["num_layers"]) and not torch.equal(weights_native[0], weights_native[1])
    loaded = dualreal_parts(exported)
    with torch.no_grad(), attached(theirs, loaded):
        loaded[1].set_condition(c)
        v_theirs = theirs.forward(x, torch.tensor([0.3, 0.8]), context)
        assert torch.allclose(loaded[0].block_weights, weights_native, atol=1e-5)
    assert torch.allclose(v_native.detach(), v_theirs, atol=1e-4)
    assert torch.equal(native.forward(x, 0.4, context), plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in native.model.modules())


def test_synmotion_motion_preset_on_comfyuis_wan_covers_q_k_v_of_every_attention_and_acts_as_on_diffusers():
    from custvid_core.adapters import LoraAdapters, synmotion_motion_lora

    native, theirs = tiny_pair()
    x, context = torch.randn(1, 16, 2, 6, 8), torch.randn(1, 5, TINY["text_dim"])
    spec = synmotion_motion_lora(4)
    with LoraAdapters(theirs, [spec]) as adapters:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # trained-looking weights
            for p in adapters.parameters("motion"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        lora = adapters.native_state_dict("motion")
        with torch.no_grad():
            v_theirs = theirs.forward(x, 0.4, context)
    with torch.no_grad():
        plain = native.forward(x, 0.4, context)
    with LoraAdapters(native, [spec]) as adapters:
        adapters.load_native_state_dict("motion", lora)
        on = {n.removesuffix(".lora_down.weight") for n in adapters.native_state_dict("motion")
              if n.endswith(".lora_down.weight")}
        with torch.no_grad():
            v_native = native.forward(x, 0.4, context)
    assert on == {f"diffusion_model.blocks.{b}.{a}.{p}" for b in range(TINY["num_layers"])
                  for a in ("self_attn", "cross_attn") for p in "qkv"}
    assert (v_native - plain).abs().max() > 1e-3
    assert torch.allclose(v_native, v_theirs, atol=1e-4)


@pytest.mark.parametrize("cast", [False, True], ids=["own_weights", "cast_weights"])
def test_block_swap_and_checkpoint_choices_on_comfyuis_wan_keep_the_forward_and_gradients(cast, monkeypatch):
    """The same mechanism on ComfyUI's WanModel as on diffusers': swapped blocks compute with device copies brought in
    for the forward and the recomputation; gradients as without, and as diffusers' under the same settings. `cast`:
    ComfyUI's layers casting their weights as they run (as training sets them, and as low-VRAM loading does)."""
    from custvid_core.backbones.memory import BlockSwap, MemorySettings

    import_pack().nodes.host.enable_rope_backward()
    native, theirs = tiny_pair()
    for m in native.model.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = cast
    for backbone in (native, theirs):
        backbone.model.requires_grad_(False)
    moved = []

    def counted(self, t, device, non_blocking=False):  # a move to another device makes a copy
        moved.append(t)
        return t.detach().clone()

    monkeypatch.setattr(BlockSwap, "_to", counted)

    def forward_backward(backbone, checkpointing=False, memory=MemorySettings()):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 2, 6, 8, generator=g).requires_grad_()
        context = torch.randn(2, 5, TINY["text_dim"], generator=g).requires_grad_()
        with backbone.training_memory(checkpointing, memory):
            v = backbone.forward(x, torch.tensor([0.3, 0.8]), context)
            v.square().mean().backward()
        return v.detach(), x.grad, context.grad

    plain = forward_backward(native)
    for checkpointing, memory in ((False, MemorySettings(blocks_to_swap=1)), (True, MemorySettings(blocks_to_swap=2)),
                                  (True, MemorySettings(recompute_every=2, offload_activations=True, blocks_to_swap=1))):
        moved.clear()
        saved = forward_backward(native, checkpointing, memory)
        swapped = [t for b in native.blocks[TINY["num_layers"] - memory.blocks_to_swap:] for t in b.parameters()]
        assert len(moved) == 4 * len(swapped) and {id(t) for t in moved} == {id(t) for t in swapped}
        for a, b in zip(plain, saved):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
        for a, b in zip(saved, forward_backward(theirs, checkpointing, memory)):
            assert torch.allclose(a, b, atol=1e-4)
    assert all("forward" not in b.__dict__ for b in native.blocks)
