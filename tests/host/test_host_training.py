"""Training nodes on ComfyUI's own Wan (a tiny Wan 2.1 checkpoint loaded by ComfyUI, in-process):
the user's MODEL is never changed, the LoRA loads through the stock loader without a missing key
and changes its output, and training stacks with a stock LoRA and with low-VRAM partial loading."""

import logging

import pytest
import torch
from comfy_host import import_pack, partially_loaded, tiny_wan_vae_weights, tiny_world_wan
from world_data import star_photos, weights

from custvid_core.world.model import save_world
from custvid_core.world.scene import Scene, WorldSpec, render


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny Wan 2.1 file (ComfyUI's native keys) loaded by ComfyUI's own loader, and the world's text + VAE."""
    patcher, world, _ = tiny_world_wan(tmp_path_factory.mktemp("tiny_wan"))
    return patcher, world, import_pack()


def _nodes(pack):
    from custvid_pack.nodes import training_nodes, world_nodes

    return training_nodes, world_nodes


def _conditioning(world, prompt):
    with torch.no_grad():
        return [[world.text([prompt]), {}]]


def _subject_dataset(pack, world):
    training, world_nodes = _nodes(pack)
    images, masks = star_photos(3)
    clip = render(Scene(), WorldSpec())
    vae = world_nodes.WorldVAE()
    clips = training.VideoDataset.execute(vae, clip.frames, _conditioning(world, clip.prompt)).result[0]
    return training.SubjectDataset.execute(vae, images, _conditioning(world, "sks"), masks=masks,
                                           preservation=clips).result[0]


def _denoise(patcher, seed=0):
    """What ComfyUI's sampler sees from this MODEL: load it with its patches, run apply_model."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 32, 32, generator=g)
    context = torch.randn(1, 16, 4096, generator=g)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=context)


def _train(pack, patcher, subject, **overrides):
    training, _ = _nodes(pack)
    args = dict(steps=3, learning_rate=1e-3, rank=4, roles="self_attn.q, self_attn.k, ffn.0", batch_size=1,
                alignment_weight=0.0, alignment_block=1, timestep_sampling="uniform", shift=1.0,
                gradient_checkpointing=True, training_seed=0, checkpoint_every=100, run_name="subject_test",
                preservation_weight=1.0, region_loss=True)
    args.update(overrides)
    return training.TrainSubjectLoRA.execute(patcher, subject, **args).result[:4]  # without the low-noise expert's


def _clip(world):
    """The world's text encoder as Load Shapes World gives it: a CLIP."""
    return import_pack().nodes.world_nodes.world_clip(world.text)


def test_training_leaves_the_model_alone_and_its_lora_loads_through_the_stock_loader(wan, tmp_path, caplog):
    import folder_paths

    import nodes as comfy_nodes

    patcher, world, pack = wan
    before_state, before_out = weights(patcher), _denoise(patcher)
    folder_paths.set_output_directory(str(tmp_path))
    subject = _subject_dataset(pack, world)
    model, lora, graph, _ = _train(pack, patcher, subject)
    # The user's MODEL: same weights, same patches, same output.
    after = weights(patcher)
    assert all(torch.equal(after[k], before_state[k]) for k in before_state)
    assert not patcher.patches
    assert torch.allclose(_denoise(patcher), before_out)
    assert not any("lora" in n for n, _ in patcher.model.diffusion_model.named_modules())
    # The returned MODEL carries the LoRA as ordinary patches; its output differs.
    assert len(model.patches) == 2 * 3  # 2 blocks x 3 roles
    assert not torch.allclose(_denoise(model), before_out, atol=1e-5)
    assert graph.shape[0] == 1 and graph.shape[-1] == 3
    assert (tmp_path / "custvid_training" / "subject_test" / "checkpoint.pt").exists()

    # Saved to models/loras and loaded by the stock LoraLoaderModelOnly: no missing key, same output.
    loras = tmp_path / "loras"
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    training, _ = _nodes(pack)
    name = training.SaveLoRA.execute(lora, "custvid/test_subject", "sks", False).result[0]
    assert (loras / "custvid" / "test_subject.safetensors").exists() and name == "custvid/test_subject.safetensors"
    saved = (loras / "custvid" / "test_subject.safetensors").read_bytes()
    with pytest.raises(ValueError, match="filename: 'custvid/test_subject.safetensors' already exists in .*loras"):
        training.SaveLoRA.execute(lora, "custvid/test_subject", "sks", False)
    assert (loras / "custvid" / "test_subject.safetensors").read_bytes() == saved
    with caplog.at_level(logging.WARNING):
        (stock,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert torch.allclose(_denoise(stock), _denoise(model), atol=1e-5)


def test_trigger_words_turn_on_the_subject_token_attention_loss(wan, tmp_path):
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    training, world_nodes = _nodes(pack)
    images, masks = star_photos(2)
    subject = training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "a sks"), masks=masks,
                                              prompt="a sks", trigger_words="sks", clip=_clip(world)).result[0]
    assert subject.subject_tokens == (1,)
    _train(pack, patcher, subject, run_name="stca_test", steps=2)
    history = torch.load(tmp_path / "custvid_training" / "stca_test" / "checkpoint.pt", weights_only=True)["history"]
    assert len(history) == 2 and all(r["token_attention"] > 0 for r in history)
    with pytest.raises(ValueError, match="trigger_words: 'dog' is not"):
        training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "a sks"), masks=masks,
                                        prompt="a sks", trigger_words="dog", clip=_clip(world))


def test_a_trigger_embedding_is_learned_added_at_the_trigger_words_saved_and_loaded(wan, tmp_path):
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    folder_paths.add_model_folder_path("custvid_trigger_embeddings", str(tmp_path / "embeddings"), is_default=True)
    training, world_nodes = _nodes(pack)
    from custvid_pack.nodes.embedding_nodes import ApplyTriggerEmbedding, LoadTriggerEmbedding, SaveTriggerEmbedding

    images, _ = star_photos(2)
    # Trigger words without masks: no attention loss, but an embedding can be learned at them.
    subject = training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "a sks"),
                                              prompt="a sks", trigger_words=" sks ", clip=_clip(world)).result[0]
    assert subject.trigger_words == "sks" and subject.subject_tokens == (1,)
    learned = _train(pack, patcher, subject, run_name="embedding", steps=3, learning_rate=1e-2, region_loss=False,
                     trigger_embedding=True)[3]
    assert learned.trigger_words == "sks" and learned.residual.shape == (1, 4096)
    assert float(learned.residual.abs().max()) > 0

    # Added where the words sit in another prompt and nowhere else; the input conditioning is unchanged.
    prompt = "a sks star moving right"
    conditioning = _conditioning(world, prompt)
    before = conditioning[0][0].clone()
    applied = ApplyTriggerEmbedding.execute(conditioning, learned, prompt, clip=_clip(world)).result[0]
    assert torch.equal(conditioning[0][0], before)
    moved = applied[0][0] - before
    assert torch.allclose(moved[0, 1], learned.residual[0])
    assert torch.equal(moved[0, [0, 2, 3, 4]], torch.zeros(4, 4096))

    # Saved with its words and loaded back the same; an existing name is kept unless overwrite is on.
    name = SaveTriggerEmbedding.execute(learned, "custvid/star", False).result[0]
    loaded = LoadTriggerEmbedding.execute(name).result[0]
    assert name == "custvid/star.safetensors" and loaded.trigger_words == "sks"
    assert torch.equal(loaded.residual, learned.residual)
    saved = (tmp_path / "embeddings" / "custvid" / "star.safetensors").read_bytes()
    with pytest.raises(ValueError, match="filename: 'custvid/star.safetensors' already exists"):
        SaveTriggerEmbedding.execute(loaded, "custvid/star", False)
    assert (tmp_path / "embeddings" / "custvid" / "star.safetensors").read_bytes() == saved

    # Words with another token count than in training, a train run without an embedding, trigger words missing.
    with pytest.raises(ValueError, match="trigger_words: 'sks star' is 2 tokens in this prompt"):
        ApplyTriggerEmbedding.execute(conditioning, learned, prompt, trigger_words="sks star", clip=_clip(world))
    none = _train(pack, patcher, subject, run_name="no_embedding", steps=1, region_loss=False)[3]
    with pytest.raises(ValueError, match="trigger_embedding: the train node learned none"):
        ApplyTriggerEmbedding.execute(conditioning, none, prompt, clip=_clip(world))
    no_words = training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "sks")).result[0]
    with pytest.raises(ValueError, match="trigger_embedding: a trigger embedding is learned at the trigger word"):
        _train(pack, patcher, no_words, run_name="no_words", steps=1, region_loss=False, trigger_embedding=True)
    assert not (tmp_path / "custvid_training" / "no_words").exists()


def test_moving_clips_of_the_photos_are_encoded_and_trained_on(wan, tmp_path):
    import comfy.sd
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    training, world_nodes = _nodes(pack)
    images, masks = star_photos(2)

    def dataset(vae, **moving):
        return training.SubjectDataset.execute(vae, images, _conditioning(world, "sks"), masks=masks, **moving).result[0]

    subject = dataset(world_nodes.WorldVAE(), moving_clips=3, moving_frames=5, moving_travel=0.35)
    assert subject.moving.latents.shape == (6, 16, 1, 32, 32) and subject.moving.masks.shape == (6, 1, 1, 32, 32)
    # A moving clip's mask covers the star along its path: more cells than the photo's.
    assert bool((subject.moving.masks.flatten(1).sum(1) > subject.masks.repeat_interleave(3, 0).flatten(1).sum(1)).all())
    chained = training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "sks"), masks=masks,
                                              add_to=subject, moving_clips=1, moving_frames=5).result[0]
    assert chained.latents.shape[0] == 4 and chained.moving.latents.shape[0] == 8
    # On ComfyUI's own Wan VAE a 5-frame clip is 2 latent frames; the masks follow.
    wan_vae = comfy.sd.VAE(sd=tiny_wan_vae_weights())
    on_wan = dataset(wan_vae, moving_clips=1, moving_frames=5)
    assert on_wan.moving.latents.shape == (2, 16, 2, 4, 4) and on_wan.moving.masks.shape == (2, 1, 2, 4, 4)

    def region_losses(run_name, share):
        _train(pack, patcher, subject, run_name=run_name, steps=2, preservation_weight=0.0, moving_share=share)
        path = tmp_path / "custvid_training" / run_name / "checkpoint.pt"
        return [r["region"] for r in torch.load(path, weights_only=True)["history"]]

    # Same seed and noise: every step on the clips instead of the photos changes what is learned from.
    assert region_losses("photos_only", 0.0) != pytest.approx(region_losses("moving_only", 1.0), rel=1e-3)
    with pytest.raises(ValueError, match="moving_clips: the subject is cut out by its mask"):
        training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "sks"), moving_clips=1)
    with pytest.raises(ValueError, match="moving_frames: 7 frames"):
        dataset(wan_vae, moving_clips=1, moving_frames=7)


def test_a_region_margin_reaches_the_region_loss(wan, tmp_path):
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    subject = _subject_dataset(pack, world)

    def region_losses(run_name, **margin):
        _train(pack, patcher, subject, run_name=run_name, steps=2, preservation_weight=0.0, **margin)
        path = tmp_path / "custvid_training" / run_name / "checkpoint.pt"
        return [r["region"] for r in torch.load(path, weights_only=True)["history"]]

    # Same seed, same batches: only the band around the star is added to the loss.
    assert region_losses("margin_0") != pytest.approx(region_losses("margin_2", region_margin=2), rel=1e-3)


def test_training_stacks_on_a_stock_lora(wan, tmp_path):
    """A LoRA applied by the stock loader before training stays in effect during and after training."""
    import comfy.sd
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    g = torch.Generator().manual_seed(5)
    speed = {f"diffusion_model.blocks.{b}.self_attn.v.{k}": v for b in range(2) for k, v in
             (("lora_down.weight", torch.randn(2, 128, generator=g) * 0.3),
              ("lora_up.weight", torch.randn(128, 2, generator=g) * 0.3), ("alpha", torch.tensor(2.0)))}
    stacked, _ = comfy.sd.load_lora_for_models(patcher, None, speed, 1.0, 0)
    with_speed = _denoise(stacked)
    assert not torch.allclose(with_speed, _denoise(patcher), atol=1e-5)
    subject = _subject_dataset(pack, world)
    model, lora, _, _ = _train(pack, stacked, subject, run_name="stacked")
    # The stock LoRA is still on the input and on the output; ours is added on top of it.
    assert torch.allclose(_denoise(stacked), with_speed, atol=1e-6)
    ours_alone, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    both, _ = comfy.sd.load_lora_for_models(stacked, None, lora, 1.0, 0)
    assert torch.allclose(_denoise(model), _denoise(both), atol=1e-5)
    assert not torch.allclose(_denoise(model), _denoise(ours_alone), atol=1e-5)


def test_training_with_low_vram_partial_loading_matches_full_loading(wan, tmp_path):
    """ComfyUI's partial loading (weights cast per layer with their patches) trains the same LoRA."""
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    subject = _subject_dataset(pack, world)
    _, full, _, _ = _train(pack, patcher, subject, run_name="full", gradient_checkpointing=False)
    with partially_loaded(patcher) as lowvram_layers:  # what a small GPU does
        _, low, _, _ = _train(pack, patcher, subject, run_name="low", gradient_checkpointing=False)
    assert lowvram_layers, "the partial load did not leave any layer to be cast on the fly"
    for k, v in full.items():
        assert torch.allclose(v, low[k], atol=1e-5), k


def test_memory_savings_learn_the_same_lora_also_over_low_vram_partial_loading(wan, tmp_path):
    """recompute_every, offload_activations and blocks_to_swap train the same LoRA as without them, and
    blocks_to_swap on top of ComfyUI's own partial loading too; the MODEL's weights are left as they were."""
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    subject = _subject_dataset(pack, world)
    before = weights(patcher)
    _, plain, _, _ = _train(pack, patcher, subject, run_name="plain")
    _, saved, _, _ = _train(pack, patcher, subject, run_name="saved", recompute_every=2, offload_activations=True,
                            blocks_to_swap=1)
    with partially_loaded(patcher) as lowvram_layers:
        _, low, _, _ = _train(pack, patcher, subject, run_name="low", blocks_to_swap=2)
    assert lowvram_layers, "the partial load did not leave any layer to be cast on the fly"
    for k, v in plain.items():
        assert torch.allclose(v, saved[k], atol=1e-5) and torch.allclose(v, low[k], atol=1e-5), k
    after = weights(patcher)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case, match", [
    ("no_steps", "steps"),
    ("bad_role", "roles"),
    ("mask_count", "masks"),
    ("escape", "run_name"),
    ("short_clip", "frames"),
    ("too_many_swapped", "blocks_to_swap"),
])
def test_bad_training_input_names_the_input(wan, tmp_path, case, match):
    import folder_paths

    patcher, world, pack = wan
    training, world_nodes = _nodes(pack)
    folder_paths.set_output_directory(str(tmp_path))
    vae = world_nodes.WorldVAE()
    before = weights(patcher)
    # ValueError: the pack's InputError (imported as ComfyUI imports the pack, a different module object)
    with pytest.raises(ValueError, match=match):
        if case == "mask_count":
            photo = render(Scene(), WorldSpec(frames=1))
            training.SubjectDataset.execute(vae, photo.frames.expand(2, -1, -1, -1), _conditioning(world, "sks"),
                                            masks=photo.masks)
        elif case == "short_clip":
            training.VideoDataset.execute(vae, render(Scene(), WorldSpec(frames=1)).frames,
                                          _conditioning(world, "mtn"))
        else:
            subject = _subject_dataset(pack, world)
            overrides = {"no_steps": dict(steps=0), "bad_role": dict(roles="self_attn.x"),
                         "escape": dict(run_name="../../elsewhere"), "too_many_swapped": dict(blocks_to_swap=3)}[case]
            _train(pack, patcher, subject, **overrides)
    after = weights(patcher)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not (tmp_path / "custvid_training").exists() or not any((tmp_path / "custvid_training").rglob("*.pt"))


def test_rope_backward_through_comfy_kitchen_matches_torch(wan):
    """With comfy-kitchen installed, Wan's fused RoPE gets a backward equal to the pure-torch rotation's."""
    import comfy.ldm.flux.math as flux_math
    from custvid_pack.nodes.host import enable_rope_backward

    enable_rope_backward()
    x = torch.randn(2, 6, 1, 8, requires_grad=True)
    freqs = flux_math.rope(torch.arange(6.0)[None], 8, 10000)[:, :, None]
    grad = torch.randn(2, 6, 1, 8)
    (flux_math.apply_rope1(x, freqs) * grad).sum().backward()
    fused = x.grad.clone()
    x.grad = None
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    reference = (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape)
    (reference * grad).sum().backward()
    assert torch.allclose(fused, x.grad, atol=1e-6)


def test_a_model_loaded_under_inference_mode_trains_and_keeps_its_output(wan, tmp_path):
    """ComfyUI runs loader nodes under inference mode, so the weights are inference tensors."""
    import comfy.sd
    import folder_paths

    _, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    path = tmp_path / "inference_wan.safetensors"
    save_world(world, path, tmp_path / "t.safetensors")
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(path))
    assert next(patcher.model.diffusion_model.parameters()).is_inference()
    before = _denoise(patcher)
    training, _ = _nodes(pack)
    clips = training.VideoDataset.execute(__import__("custvid_pack").nodes.world_nodes.WorldVAE(),
                                          render(Scene(), WorldSpec()).frames, _conditioning(world, "mtn")).result[0]
    model, lora, _ = training.TrainMotionLoRA.execute(
        patcher, clips, steps=2, learning_rate=1e-3, rank=4, roles="self_attn.v, ffn.2", batch_size=1,
        alignment_weight=0.0, alignment_block=1, timestep_sampling="uniform", shift=1.0, gradient_checkpointing=True,
        training_seed=0, checkpoint_every=100, run_name="inference_mode", spatial_rank=2, debiased_weight=1.0).result[:3]
    assert torch.allclose(_denoise(patcher), before, atol=1e-6)
    assert any(k.endswith("self_attn.v.lora_up.weight") for k in lora)


def _raft(pack):
    from custvid_pack.nodes.host import ManagedModel

    from custvid_core.representations.motion import build_raft

    torch.manual_seed(0)
    encoder = build_raft("raft_small")
    return ManagedModel.wrap(encoder, encoder.model)


def test_a_clip_in_other_colours_joins_the_dataset_with_its_caption_and_flow(wan):
    _, world, pack = wan
    training, world_nodes = _nodes(pack)
    vae = world_nodes.WorldVAE()
    clip = render(Scene(colour="red", speed=2.0), WorldSpec())
    flow = type("Rep", (), {"flow": torch.randn(4, 2, 32, 32)})()
    conditioning = _conditioning(world, "red circle mtn")
    plain = training.VideoDataset.execute(vae, clip.frames, conditioning, motion_representation=flow).result[0]
    clips = training.VideoDataset.execute(vae, clip.frames, conditioning, motion_representation=flow, add_to=plain,
                                          hue_copies=2).result[0]
    assert clips.latents.shape[0] == clips.flow.shape[0] == clips.stills.shape[0] == clips.context.shape[0] == 4
    assert torch.equal(clips.latents[1], plain.latents[0]) and not torch.allclose(clips.latents[2], plain.latents[0])
    assert all(torch.equal(f, flow.flow) for f in clips.flow)
    assert all(torch.equal(c, conditioning[0][0][0]) for c in clips.context)
    assert clips.stills.shape[1:] == plain.stills.shape[1:]


def test_decoded_flow_decodes_through_comfyui_wan_vae_with_gradients(wan):
    """A tiny Wan 2.1 VAE built by ComfyUI's own VAE loader from a state dict: the differentiable decode gives
    ComfyUI's decode (in the model's latent space) and passes gradients back to the latents."""
    import comfy.latent_formats
    import comfy.sd

    _, _, pack = wan
    from custvid_pack.nodes.host import decoder_with_grad

    torch.manual_seed(0)
    vae = comfy.sd.VAE(sd=tiny_wan_vae_weights())
    params_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    latent_format = comfy.latent_formats.Wan21()
    flow = decoder_with_grad(vae, latent_format.process_out, _raft(pack), window=2)
    z = torch.randn(1, 16, 3, 4, 4)
    expected = vae.decode(latent_format.process_out(z))
    z.requires_grad_()
    frames = flow.decode(z)
    assert frames.shape == expected.shape == (1, 9, 32, 32, 3)
    assert torch.allclose(frames.detach(), expected, atol=1e-5)
    frames.mean().backward()
    assert z.grad.abs().sum() > 0
    assert flow.pixel_frames(1, 3) == (4, 9)
    assert all(torch.equal(v, params_before[k]) for k, v in vae.first_stage_model.state_dict().items())
    assert all(p.grad is None for p in vae.first_stage_model.parameters())


def test_motion_lora_with_decoded_flow_alignment_on_the_world_vae(wan, tmp_path):
    import folder_paths

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    training, world_nodes = _nodes(pack)
    vae = world_nodes.WorldVAE()
    clip = render(Scene(speed=2.0), WorldSpec())
    flow = type("Rep", (), {"flow": torch.zeros(4, 2, 32, 32)})()
    clips = training.VideoDataset.execute(vae, clip.frames, _conditioning(world, "mtn"),
                                          motion_representation=flow).result[0]
    before = weights(patcher)
    args = dict(steps=2, learning_rate=1e-3, rank=4, roles="self_attn.v, ffn.2", batch_size=1, alignment_weight=1.0,
                alignment_block=1, timestep_sampling="uniform", shift=1.0, gradient_checkpointing=False,
                training_seed=0, checkpoint_every=100, run_name="decoded_flow", spatial_rank=0, debiased_weight=1.0,
                motion_alignment="decoded_flow")
    model, lora, _ = training.TrainMotionLoRA.execute(patcher, clips, vae=vae, raft=_raft(pack), **args).result[:3]
    assert any(k.endswith("self_attn.v.lora_up.weight") for k in lora)
    assert all(torch.equal(v, before[k]) for k, v in weights(patcher).items())
    # ValueError: the pack's InputError (a different module object from the test's import)
    with pytest.raises(ValueError, match="raft: is not connected"):
        training.TrainMotionLoRA.execute(patcher, clips, vae=vae, **args)
    with pytest.raises(ValueError, match="vae: is not connected"):
        training.TrainMotionLoRA.execute(patcher, clips, raft=_raft(pack), **args)


def test_the_lora_output_keeps_its_spec_through_save_lora_and_the_stock_lora_nodes(wan, tmp_path):
    """The LORA a train node outputs carries its spec, base model and trigger words to Save LoRA, which writes the
    metadata the core's save_lora writes; ComfyUI's own LORA_MODEL nodes take it as the plain dict they expect,
    and a plain dict from another node still saves."""
    import folder_paths
    from comfy_extras.nodes_train import LoraModelLoader
    from comfy_extras.nodes_train import SaveLoRA as StockSaveLoRA
    from safetensors.torch import load_file

    from custvid_core.adapters.lora import base_model_signature, read_lora
    from custvid_core.backbones import describe

    patcher, world, pack = wan
    folder_paths.set_output_directory(str(tmp_path))
    loras = tmp_path / "loras"
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    training, world_nodes = _nodes(pack)
    images, masks = star_photos(2)
    subject = training.SubjectDataset.execute(world_nodes.WorldVAE(), images, _conditioning(world, "a sks"), masks=masks,
                                              prompt="a sks", trigger_words="sks", clip=_clip(world)).result[0]
    _, lora, _, _ = _train(pack, patcher, subject, run_name="spec_test", steps=2)
    assert isinstance(lora, dict) and lora.spec is not None and lora.trigger_words == "sks"

    name = training.SaveLoRA.execute(lora, "custvid/with_spec", "", False).result[0]
    tensors, spec, meta = read_lora(loras / name)
    assert spec.to_dict() == lora.spec.to_dict() and meta["custvid.lora.info"] == {"trigger_words": "sks"}
    assert meta["custvid.lora.base_model"] == base_model_signature(describe(patcher.model.diffusion_model))
    assert all(torch.equal(tensors[k], v) for k, v in lora.items())
    # Words typed into Save LoRA are stored instead.
    name = training.SaveLoRA.execute(lora, "custvid/typed_words", "sks star", False).result[0]
    assert read_lora(loras / name)[2]["custvid.lora.info"] == {"trigger_words": "sks star"}

    # A plain dict (another node's LoRA): saved with the ranks and roles its tensors show.
    name = training.SaveLoRA.execute(dict(lora), "custvid/plain", "sks", False).result[0]
    _, spec, meta = read_lora(loras / name)
    assert spec is None and "custvid.lora.base_model" not in meta
    assert meta["custvid.lora.info"] == {"ranks": [4], "roles": ["ffn.0", "self_attn.k", "self_attn.q"],
                                         "trigger_words": "sks"}

    # ComfyUI's own LORA_MODEL nodes: Load LoRA Model patches as with a plain dict; Save LoRA Weights writes it.
    (with_spec,) = LoraModelLoader.execute(patcher, lora, 1.0).result
    (with_dict,) = LoraModelLoader.execute(patcher, dict(lora), 1.0).result
    assert len(with_spec.patches) == len(with_dict.patches) == 2 * 3
    assert torch.allclose(_denoise(with_spec), _denoise(with_dict))
    StockSaveLoRA.execute(lora, "loras/stock")
    (written,) = (tmp_path / "loras").glob("stock_*.safetensors")
    assert load_file(written).keys() == lora.keys()
