"""`python -m custvid_core train` against the real host: ComfyUI's own loader reads the ComfyUI single file the config
trained on as the same model the command loaded host-free, and its stock LoraLoaderModelOnly loads the LoRA the command
wrote without a missing key, changing the model's output exactly as the LoRA did in training's model; and the data the
command encodes are the latents ComfyUI's VAE Encode gives, in the model's latent format."""

import logging

import torch
from comfy_host import import_comfy
from test_train_config import SUBJECT, comfy_single_file, config_file, tiny_pipeline, write_data

from custvid_core.adapters.lora import SUBJECT_ROLES, LoraAdapters, read_lora
from custvid_core.backbones import describe
from custvid_core.training.config import load_config, load_wan_transformer, train_from_config


def _inputs():
    g = torch.Generator().manual_seed(3)
    context = torch.zeros(1, 512, 4096)  # a prompt's rows, then zeros to Wan's 512 text tokens
    context[:, :6] = torch.randn(1, 6, 4096, generator=g)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([0.6]), context


def test_the_commands_lora_loads_with_stock_comfyui_and_changes_the_model_as_in_training(tmp_path, caplog):
    import_comfy()
    import comfy.model_management
    import comfy.sd
    import folder_paths

    import nodes as comfy_nodes

    tiny_pipeline(tmp_path / "wan", text_dim=4096)  # ComfyUI reads Wan files as taking UMT5-XXL's 4096-wide text
    single, _ = comfy_single_file(tmp_path / "wan_t2v_tiny.safetensors", text_dim=4096)
    write_data(tmp_path)
    text = SUBJECT.replace('path = "wan"', 'path = "wan_t2v_tiny.safetensors"\nvae = "wan/vae"\n'
                                           'text_encoder = "wan/text_encoder"\ntokenizer = "wan/tokenizer"')
    files = train_from_config(load_config(config_file(tmp_path, text.replace("lr = 1e-3", "lr = 3e-2"))))

    x, sigma, context = _inputs()
    ours = describe(load_wan_transformer(single, torch.float32))
    patcher = comfy.sd.load_diffusion_model(str(single))
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        base = describe(patcher.model.diffusion_model).forward(x, sigma, context)
        assert torch.allclose(base, ours.forward(x, sigma, context), atol=1e-4)  # the same model, host-free

    folder_paths.add_model_folder_path("loras", str(files["lora"].parent), is_default=True)
    with caplog.at_level(logging.WARNING):
        (stock,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, files["lora"].name, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(stock.patches) == 2 * len(SUBJECT_ROLES)
    comfy.model_management.load_models_gpu([stock])
    tensors, spec, _ = read_lora(files["lora"])
    with torch.no_grad(), LoraAdapters(ours, [spec]) as adapters:
        adapters.load_native_state_dict(spec.name, tensors)
        expected = ours.forward(x, sigma, context)
        patched = describe(stock.model.diffusion_model).forward(x, sigma, context)
    assert not torch.allclose(patched, base, atol=1e-3)
    assert torch.allclose(patched, expected, atol=1e-4)


def test_the_commands_latents_are_comfyuis_vae_encode_in_the_models_latent_format(tmp_path):
    """The same Wan VAE weights in ComfyUI's layout (VAE Encode, then the Wan 2.1 latent format a model applies) and in
    diffusers' layout (converted by diffusers' own converter): the config's encoding gives the same latents."""
    from comfy_host import tiny_wan_vae_weights
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from custvid_core.training.config import ModelConfig, _vae_encoder, latent_stats

    import_comfy()
    import comfy.latent_formats
    import comfy.sd

    weights = tiny_wan_vae_weights()
    theirs = AutoencoderKLWan(base_dim=8, z_dim=16)
    theirs.load_state_dict(convert_wan_vae_to_diffusers(dict(weights)), strict=True)
    theirs.save_pretrained(tmp_path / "vae")
    frames = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        comfy_latents = comfy.latent_formats.Wan21().process_in(comfy.sd.VAE(sd=weights).encode(frames).float())
    encode, _ = _vae_encoder(tmp_path / "vae", torch.device("cpu"), torch.float32)
    mean, std = latent_stats(ModelConfig(tmp_path / "model.safetensors", vae=tmp_path / "vae"), 16)
    ours = (encode(frames[None]) - mean) / std
    assert ours.shape == comfy_latents.shape == (1, 16, 2, 4, 6)
    assert torch.allclose(ours, comfy_latents, atol=1e-3 * float(comfy_latents.abs().max()))
