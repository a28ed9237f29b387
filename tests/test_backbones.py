import pytest
import torch
from builders import residual_effect, tiny_diffusers_wan

from custvid_core.backbones import ROLES, describe, diffusers_to_native_key
from custvid_core.errors import InputError

# Published Wan 2.1 text-to-video configurations (diffusers' WanTransformer3DModel arguments).
WAN21 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
             freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
WAN21_1_3B = dict(WAN21, num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN21_14B = dict(WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def test_tiny_diffusers_wan_forward_capture_and_grid():
    backbone = describe(tiny_diffusers_wan())
    assert backbone.implementation == "diffusers"
    x, context = torch.randn(2, 16, 3, 8, 10), torch.randn(2, 5, 64)
    assert backbone.token_grid(x.shape) == (3, 4, 5)
    with backbone.capture([0, 1]) as hidden:
        v = backbone.forward(x, torch.tensor([0.3, 0.9]), context)
    assert v.shape == x.shape
    assert hidden[0].shape == hidden[1].shape == (2, 3 * 4 * 5, 32)
    # The last block's hidden state feeds the output head: the capture is the real one.
    model = backbone.model
    with torch.no_grad():
        t = torch.tensor([300.0, 900.0])
        temb, _, _, _ = model.condition_embedder(t, context, None)
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        out = model.proj_out(model.norm_out(hidden[1]) * (1 + scale) + shift)
    b, (gt, gh, gw) = 2, backbone.token_grid(x.shape)
    out = out.view(b, gt, gh, gw, 1, 2, 2, 16).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape)
    assert torch.allclose(out, v, atol=1e-5)
    # After the block the hooks are gone.
    backbone.forward(x, 0.5, context)
    assert not any(b._forward_hooks for b in model.blocks)


def test_roles_resolve_to_the_right_linear_layers():
    backbone = describe(tiny_diffusers_wan())
    assert backbone.module_path(1, "self_attn.o") == "blocks.1.attn1.to_out.0"
    assert backbone.module_path(0, "ffn.0") == "blocks.0.ffn.net.0.proj"
    assert backbone.role_module(0, "cross_attn.k") is backbone.model.blocks[0].attn2.to_k
    names = [name for name, _ in backbone.role_modules()]
    assert len(names) == 2 * len(ROLES)
    assert names[0] == "diffusion_model.blocks.0.self_attn.q"
    assert names[-1] == "diffusion_model.blocks.1.ffn.2"
    with pytest.raises(InputError, match="role: 'attn.q'"):
        backbone.module_path(0, "attn.q")
    with pytest.raises(InputError, match="block: block 7"):
        backbone.native_name(7, "ffn.0")


def test_a_model_that_is_not_wan_is_refused():
    with pytest.raises(InputError, match="model: a Linear is not a Wan video transformer"):
        describe(torch.nn.Linear(2, 2))


def _published_native_layout(dim, ffn, layers, in_dim=16, text_dim=4096, freq_dim=256):
    """Weight shapes of a published native Wan 2.1 T2V checkpoint (the layout ComfyUI loads)."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (4 * in_dim, dim), "head.head.bias": (4 * in_dim,), "head.modulation": (1, 2, dim),
    }
    for b in range(layers):
        p = f"blocks.{b}."
        shapes[p + "modulation"] = (1, 6, dim)
        shapes[p + "norm3.weight"] = shapes[p + "norm3.bias"] = (dim,)
        for attn in ("self_attn", "cross_attn"):
            for x in "qkvo":
                shapes[f"{p}{attn}.{x}.weight"], shapes[f"{p}{attn}.{x}.bias"] = (dim, dim), (dim,)
            shapes[f"{p}{attn}.norm_q.weight"] = shapes[f"{p}{attn}.norm_k.weight"] = (dim,)
        shapes[p + "ffn.0.weight"], shapes[p + "ffn.0.bias"] = (ffn, dim), (ffn,)
        shapes[p + "ffn.2.weight"], shapes[p + "ffn.2.bias"] = (dim, ffn), (dim,)
    return shapes


@pytest.mark.parametrize("config, dim, keys", [(WAN21_1_3B, 1536, 825), (WAN21_14B, 5120, 1095)])
def test_real_wan21_configs_on_the_meta_device(config, dim, keys):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    backbone = describe(model)
    assert backbone.num_blocks == config["num_layers"] and backbone.dim == dim
    assert backbone.text_dim == 4096 and backbone.patch_size == (1, 2, 2)
    for b in range(backbone.num_blocks):
        for role in ROLES:
            module = backbone.role_module(b, role)
            out_f, in_f = (config["ffn_dim"], dim) if role == "ffn.0" else \
                (dim, config["ffn_dim"]) if role == "ffn.2" else (dim, dim)
            assert (module.out_features, module.in_features) == (out_f, in_f)
    native = {diffusers_to_native_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(native) == keys
    assert native == _published_native_layout(dim, config["ffn_dim"], config["num_layers"])
    # Every role's LoRA name points at a weight of the published checkpoint.
    for name, module in backbone.role_modules():
        assert native[name.removeprefix("diffusion_model.") + ".weight"] == tuple(module.weight.shape)


@pytest.mark.parametrize("site", ["self_attn", "ffn"])
def test_a_residual_beside_a_sublayer_adds_gate_times_f_of_its_input_and_leaves_no_trace(site):
    backbone = describe(tiny_diffusers_wan())
    with torch.no_grad():  # diffusers' modulation tables start near zero; make the gates matter
        for b in backbone.blocks:
            b.scale_shift_table.add_(torch.randn(b.scale_shift_table.shape, generator=torch.Generator().manual_seed(2)))
    x, context = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 5, 64)
    before = backbone.forward(x, 0.4, context)

    def chunks(block, args, kwargs):
        return (block.scale_shift_table + args[2].float()).chunk(6, dim=1)

    change, expected = residual_effect(backbone, 1, site, x, 0.4, context, "norm2", chunks)
    assert expected.abs().max() > 1e-2
    assert torch.allclose(change, expected, atol=1e-5)
    assert torch.equal(backbone.forward(x, 0.4, context), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.model.modules())
    with pytest.raises(InputError, match="site"):
        backbone.add_residual(0, "cross_attn", lambda h: h)


def test_a_text_context_edit_changes_the_forward_until_removed():
    backbone = describe(tiny_diffusers_wan())
    x, context = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 5, 64)
    before = backbone.forward(x, 0.4, context)
    edited = context.clone()
    edited[:, 2] += 1.0
    with_edited = backbone.forward(x, 0.4, edited)
    assert not torch.allclose(with_edited, before)
    handle = backbone.edit_text_context(lambda c: c + (edited - context))
    assert torch.allclose(backbone.forward(x, 0.4, context), with_edited, atol=1e-6)
    handle.remove()
    assert torch.equal(backbone.forward(x, 0.4, context), before)
