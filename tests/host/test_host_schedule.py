"""Per-step LoRA strengths inside ComfyUI's sampling (tiny Wan 2.1 loaded by ComfyUI, in-process)."""

import pytest
import torch
from comfy_host import import_pack, tiny_world_wan


def _lora(seed, roles=("self_attn.q", "ffn.0"), rank=2):
    g = torch.Generator().manual_seed(seed)
    sizes = {"self_attn.q": (128, 128), "self_attn.v": (128, 128), "ffn.0": (64, 128)}
    out = {}
    for b in range(2):
        for r in roles:
            o, i = sizes[r]
            key = f"diffusion_model.blocks.{b}.{r}"
            out[key + ".lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.3
            out[key + ".lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.3
            out[key + ".alpha"] = torch.tensor(float(rank))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    patcher, _, _ = tiny_world_wan(tmp_path_factory.mktemp("tiny_wan_schedule"))
    import_pack()
    from custvid_pack.nodes.schedule_nodes import ApplyLoRASchedule

    return patcher, ApplyLoRASchedule


def _denoise(patcher, sigma, sigmas=None):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 16, 16, generator=g)
    ctx = torch.randn(1, 16, 4096, generator=g)
    options = {"wrappers": patcher.wrappers}
    if sigmas is not None:
        options["sample_sigmas"] = sigmas
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx, transformer_options=options)


def _stock(patcher, lora, strength):
    import comfy.sd

    return comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)[0]


def test_a_changing_schedule_follows_the_sampling_steps(tiny):
    patcher, node = tiny
    lora = _lora(1)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    scheduled = node.execute(patcher, "(use lora input)", "custom", "0:0.0, 0.5:1.0", lora=lora).result[0]
    assert not patcher.weight_wrapper_patches and not patcher.wrappers.get("apply_model")
    base = _denoise(patcher, 0.75, sigmas)
    full = _denoise(_stock(patcher, lora, 1.0), 0.5, sigmas)
    assert not torch.allclose(base, _denoise(_stock(patcher, lora, 1.0), 0.75, sigmas), atol=1e-5)
    # Step 1 of 4 (fraction 0.25): strength 0, the base model; step 2 (0.5): strength 1, the stock LoRA at 1.
    assert torch.allclose(_denoise(scheduled, 0.75, sigmas), base, atol=1e-5)
    assert torch.allclose(_denoise(scheduled, 0.5, sigmas), full, atol=1e-4)


def test_smrabooth_preset_matches_the_stock_loader_at_each_strength(tiny):
    patcher, node = tiny
    lora = _lora(2)
    sigmas = torch.linspace(1, 0, 11)
    scheduled = node.execute(patcher, "(use lora input)", "smrabooth_subject", "", lora=lora).result[0]
    for sigma, strength in ((1.0, 0.6), (0.8, 0.6), (0.7, 0.8), (0.2, 0.8)):
        expected = _denoise(_stock(patcher, lora, strength), sigma, sigmas)
        assert torch.allclose(_denoise(scheduled, sigma, sigmas), expected, atol=1e-4), (sigma, strength)


def test_a_constant_schedule_is_the_stock_merged_lora_and_schedules_stack_on_stock_loras(tiny):
    patcher, node = tiny
    ours, theirs = _lora(3), _lora(4, roles=("self_attn.q", "self_attn.v"))
    constant = node.execute(patcher, "(use lora input)", "custom", "0.7", lora=ours).result[0]
    assert not constant.weight_wrapper_patches and constant.patches
    assert torch.allclose(_denoise(constant, 0.5), _denoise(_stock(patcher, ours, 0.7), 0.5), atol=1e-5)
    stacked = _stock(patcher, theirs, 1.0)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    scheduled = node.execute(stacked, "(use lora input)", "custom", "0:0.0, 0.5:1.0", lora=ours).result[0]
    assert torch.allclose(_denoise(scheduled, 1.0, sigmas), _denoise(stacked, 1.0, sigmas), atol=1e-5)
    both = _stock(stacked, ours, 1.0)
    assert torch.allclose(_denoise(scheduled, 0.5, sigmas), _denoise(both, 0.5, sigmas), atol=1e-4)


def test_sampling_with_a_schedule_runs_through_comfys_sampler(tiny):
    import comfy.sample

    patcher, node = tiny
    scheduled = node.execute(patcher, "(use lora input)", "custom", "0:0.0, 0.5:1.0", lora=_lora(5)).result[0]
    latent = torch.zeros(1, 16, 2, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    positive = [[torch.randn(1, 16, 4096), {}]]
    negative = [[torch.zeros(1, 16, 4096), {}]]
    outs = [comfy.sample.sample(m, noise, 4, 1.0, "euler", "simple", positive, negative, latent, disable_pbar=True)
            for m in (patcher, scheduled, _stock(patcher, _lora(5), 1.0))]
    assert not torch.allclose(outs[1], outs[0], atol=1e-5) and not torch.allclose(outs[1], outs[2], atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (("(use lora input)", "custom", "1.0"), "lora_name"),
    (("(use lora input)", "custom", "0.5:1, 0:2"), "schedule"),
])
def test_bad_schedule_input_names_the_input(tiny, args, match):
    patcher, node = tiny
    with pytest.raises(ValueError, match=match):
        node.execute(patcher, *args, lora=None if match == "lora_name" else _lora(1))
