"""Wan 2.2 in ComfyUI, on tiny files its own loaders detect as Wan 2.2's (random weights, the shapes world's layout):
A14B's two experts (each a Wan 2.1-layout file, as ComfyUI reads them) learning a LoRA each in one Train Motion LoRA
node, each on its side of the expert boundary, and workflow 16 training and sampling both with the pack's schedule
node and camera sampler; and TI2V-5B (48 latent channels, ComfyUI's WAN22 model and Wan 2.2 VAE, stride 4x16x16)
learning a LoRA on Wan 2.2 latents and sampling with it through ComfyUI's Wan22ImageToVideoLatent.

ComfyUI builds the Wan 2.2 VAE at its full width whatever the file holds (a 700M-parameter model), so the tiny one is
ComfyUI's own architecture and loader with the width of its layers lowered (`tiny_wan22_vae`)."""

import functools
import json

import pytest
import torch
from comfy_host import import_comfy, import_pack, tiny_world
from test_host_training import _denoise
from test_host_wan_workflows import runnable, wan_server  # noqa: F401  (the fixture, used through experts_server)
from workflow_api import shipped

from custvid_core.training.objectives import EXPERT_BOUNDARY
from custvid_core.world.model import save_world
from custvid_core.world.scene import Scene, WorldSpec, render

WORKFLOW = "16"
MOTION_ARGS = dict(steps=2, learning_rate=1e-3, rank=4, roles="self_attn.v, ffn.2", batch_size=1, alignment_weight=0.0,
                   alignment_block=1, timestep_sampling="logit_normal", shift=5.0, gradient_checkpointing=True,
                   training_seed=0, checkpoint_every=100, spatial_rank=2, debiased_weight=1.0)


@pytest.fixture(autouse=True)
def output_folder(tmp_path):
    """Each in-process test's runs in a folder of its own (ComfyUI's output folder is where runs keep checkpoints)."""
    import_comfy()
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(before)


def _expert_names() -> list[str]:
    """The high- and low-noise experts' file names in workflow 16, in that order."""
    return [n["widgets_values"][0] for n in shipped(WORKFLOW)["nodes"] if n["type"] == "UNETLoader"]


def _tiny_expert(path, seed: int, layers: int = 4) -> None:
    torch.manual_seed(seed)
    save_world(tiny_world(layers=layers), path, path.with_suffix(".text.safetensors"))


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two different tiny experts loaded by ComfyUI's own loader, and the pack."""
    import_comfy()
    import comfy.sd

    folder = tmp_path_factory.mktemp("experts")
    patchers = []
    for seed, name in enumerate(("high.safetensors", "low.safetensors")):
        _tiny_expert(folder / name, seed, layers=2)
        patchers.append(comfy.sd.load_diffusion_model(str(folder / name)))
    return (*patchers, import_pack())


def _clips(pack, vae, size=32):
    from custvid_pack.nodes import training_nodes

    clip = render(Scene(), WorldSpec(size=size))
    with torch.no_grad():
        conditioning = [[tiny_world().text([clip.prompt]), {}]]
    return training_nodes.VideoDataset.execute(vae, clip.frames, conditioning).result[0], conditioning


def test_a_tiny_a14b_expert_is_read_by_comfyui_as_the_wan_model_it_is(experts):
    import comfy.supported_models

    high, low, _ = experts
    for patcher in (high, low):
        assert type(patcher.model.model_config) is comfy.supported_models.WAN21_T2V


def test_one_node_trains_a_lora_per_expert_each_only_on_its_side_of_the_boundary(experts, monkeypatch):
    from custvid_pack.nodes import training_nodes, world_nodes

    high, low, pack = experts
    seen = []
    train_motion = training_nodes.train_motion

    def recording(backbone, *args, **kwargs):
        sigmas = []
        forward = backbone.forward
        backbone.forward = lambda x, sigma, context, image=None: (sigmas.extend(sigma.flatten().tolist()),
                                                                  forward(x, sigma, context, image))[1]
        seen.append((backbone.model, sigmas))
        return train_motion(backbone, *args, **kwargs)

    monkeypatch.setattr(training_nodes, "train_motion", recording)
    clips, _ = _clips(pack, world_nodes.WorldVAE())
    before = {"high": _denoise(high), "low": _denoise(low)}
    model, lora, graph, model_low, lora_low = training_nodes.TrainMotionLoRA.execute(
        high, clips, run_name="experts", model_low_noise=low, **MOTION_ARGS).result
    boundary = EXPERT_BOUNDARY["t2v"]
    assert [m for m, _ in seen] == [high.model.diffusion_model, low.model.diffusion_model]
    assert seen[0][1] and all(s >= boundary for s in seen[0][1]), seen[0][1]
    assert seen[1][1] and all(s <= boundary for s in seen[1][1]), seen[1][1]
    # Neither input MODEL changed; each output carries its own expert's LoRA.
    assert torch.equal(_denoise(high), before["high"]) and torch.equal(_denoise(low), before["low"])
    assert model.model is high.model and model_low.model is low.model
    assert not torch.allclose(_denoise(model), before["high"]) and not torch.allclose(_denoise(model_low), before["low"])
    assert lora.keys() == lora_low.keys() and any(not torch.equal(lora[k], lora_low[k]) for k in lora)
    assert graph.shape[0] == 2  # a loss graph per expert


def test_each_expert_previews_with_itself_into_its_own_run_folder(experts, monkeypatch, output_folder):
    from custvid_pack.nodes import training_nodes, world_nodes

    high, low, pack = experts
    sampled = []
    previewer = training_nodes.previewer

    def recording(patcher, *args):
        sampled.append(patcher)
        return previewer(patcher, *args)

    monkeypatch.setattr(training_nodes, "previewer", recording)
    clips, _ = _clips(pack, world_nodes.WorldVAE())
    out = training_nodes.TrainMotionLoRA.execute(high, clips, run_name="experts_previews", model_low_noise=low,
                                                 preview_every=2, vae=world_nodes.WorldVAE(), **MOTION_ARGS)
    # Each run's previews sample its own expert's training clone (carrying that run's LoRA), not the MODEL given.
    assert [p.model for p in sampled] == [high.model, low.model] and all(p not in (high, low) for p in sampled)
    for expert in ("high_noise", "low_noise"):
        index = output_folder / "custvid_training" / "experts_previews" / expert / "previews" / "index.json"
        assert [e["file"] for e in json.loads(index.read_text())] == ["previews/step_000002.webp"]
    assert out.ui["images"] == [{"filename": "step_000002.webp", "subfolder": f"custvid_training/experts_previews/"
                                 f"{expert}/previews", "type": "output"} for expert in ("high_noise", "low_noise")]


def test_one_expert_alone_draws_only_its_noise_levels_and_the_low_outputs_are_empty(experts, monkeypatch):
    from custvid_pack.nodes import training_nodes, world_nodes

    high, _, pack = experts
    drawn = []
    sigmas_within = training_nodes.SigmaSampler.within

    def recording(self, low, high_level):
        drawn.append((low, high_level))
        return sigmas_within(self, low, high_level)

    monkeypatch.setattr(training_nodes.SigmaSampler, "within", recording)
    clips, _ = _clips(pack, world_nodes.WorldVAE())
    result = training_nodes.TrainMotionLoRA.execute(high, clips, run_name="low_only", noise_range="low_noise",
                                                    expert_boundary=EXPERT_BOUNDARY["i2v"], **MOTION_ARGS).result
    assert drawn == [(0.0, EXPERT_BOUNDARY["i2v"])]
    assert result[3] is None and result[4] is None


def test_contradicting_expert_choices_are_refused_naming_the_input(experts):
    from custvid_pack.nodes import training_nodes, world_nodes

    high, low, pack = experts
    clips, _ = _clips(pack, world_nodes.WorldVAE())
    # ValueError: the pack's InputError (imported as ComfyUI imports the pack, another module object than the test's)
    with pytest.raises(ValueError, match="noise_range: 'high_noise' with model_low_noise connected"):
        training_nodes.TrainMotionLoRA.execute(high, clips, run_name="refused", model_low_noise=low,
                                               noise_range="high_noise", **MOTION_ARGS)
    with pytest.raises(ValueError, match="trigger_embedding: on with model_low_noise connected"):
        training_nodes.TrainSubjectLoRA.execute(high, None, run_name="refused", model_low_noise=low,
                                                trigger_embedding=True, preservation_weight=1.0, region_loss=True,
                                                **{k: v for k, v in MOTION_ARGS.items()
                                                   if k not in ("spatial_rank", "debiased_weight")})


@pytest.fixture(scope="module")
def experts_server(wan_server):  # noqa: F811
    """The session's ComfyUI with two tiny, different experts under workflow 16's file names (and the Wan 2.1 VAE and
    RAFT that `wan_server` writes)."""
    folder = wan_server.base / "models" / "diffusion_models"
    for seed, name in enumerate(_expert_names()):
        _tiny_expert(folder / name, 100 + seed)
    return wan_server


def test_workflow_16_trains_both_experts_and_samples_them_in_turn_with_the_camera(experts_server):
    prompt = runnable(WORKFLOW, experts_server)
    for node in prompt.values():  # 4 steps, the experts 2 each, so that each samples
        if node["class_type"] == "BasicScheduler":
            node["inputs"]["steps"] = 4
        elif node["class_type"] == "SplitSigmas":
            node["inputs"]["step"] = 2
    result = experts_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    loras = experts_server.base / "models" / "loras" / "custvid"
    assert (loras / "my_motion_high_noise.safetensors").stat().st_size > 1000
    assert (loras / "my_motion_low_noise.safetensors").stat().st_size > 1000
    runs = experts_server.base / "output" / "custvid_training" / "my_motion_wan22"
    for expert in ("high_noise", "low_noise"):
        history = torch.load(runs / expert / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
        assert len(history) == 2, expert
    assert experts_server.saved("custvid/wan22_motion_camera")


def tiny_wan22_vae():
    """ComfyUI's Wan 2.2 VAE (its architecture, key layout, detection, latent format and 4x16x16 stride), loaded by
    its own VAE class from a state dict with small random weights, its layers 8 wide instead of 160 and 256."""
    import_comfy()
    import comfy.ldm.wan.vae2_2 as wan22_vae
    import comfy.sd

    full = wan22_vae.WanVAE
    narrow = functools.partial(full, dim=8, dec_dim=8)
    config = dict(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    weights = {k: torch.ones_like(v) if "gamma" in k else torch.randn_like(v) * (0.1 if v.ndim > 1 else 0.01)
               for k, v in narrow(**config).state_dict().items()}
    wan22_vae.WanVAE = lambda **c: narrow(**{k: v for k, v in c.items() if k not in ("dim", "dec_dim")})
    try:
        return comfy.sd.VAE(sd=weights)
    finally:
        wan22_vae.WanVAE = full


def test_a_tiny_ti2v_5b_learns_a_lora_on_wan22_latents_and_samples_with_it_from_a_start_image(tmp_path):
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent
    from custvid_pack.nodes import training_nodes

    torch.manual_seed(0)
    save_world(tiny_world(layers=2, in_channels=48, out_channels=48), tmp_path / "ti2v_5b.safetensors",
               tmp_path / "text.safetensors")
    patcher = comfy.sd.load_diffusion_model(str(tmp_path / "ti2v_5b.safetensors"))
    assert type(patcher.model.model_config) is comfy.supported_models.WAN22_T2V
    vae = tiny_wan22_vae()
    assert vae.latent_channels == 48
    clips, conditioning = _clips(import_pack(), vae, size=64)
    assert tuple(clips.latents.shape) == (1, 48, 2, 4, 4)  # 5 frames of 64 x 64: 4x16x16 stride
    model, lora, _ = training_nodes.TrainMotionLoRA.execute(patcher, clips, run_name="ti2v_5b", **MOTION_ARGS).result[:3]
    assert lora and all(k.startswith("diffusion_model.blocks.") for k in lora)

    start = render(Scene(), WorldSpec(size=64)).frames[:1]
    latent = Wan22ImageToVideoLatent.execute(vae, 64, 64, 5, 1, start_image=start).result[0]

    def sample(m):  # as KSampler samples a latent with a noise mask
        noise = comfy.sample.prepare_noise(latent["samples"], 0)
        return comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", conditioning, conditioning, latent["samples"],
                                   noise_mask=latent["noise_mask"], seed=0, disable_pbar=True)

    trained, base = sample(model), sample(patcher)
    assert trained.shape == (1, 48, 2, 4, 4) and torch.isfinite(trained).all()
    assert not torch.allclose(trained, base)  # the LoRA acts in ComfyUI's sampling of the 5B
    # The start image's latent frame is kept (its mask is 0, ComfyUI's per-token timesteps for TI2V).
    assert torch.allclose(trained[:, :, :1], latent["samples"][:, :, :1])
    frames = vae.decode(trained)
    assert frames.shape[-4:] == (5, 64, 64, 3) and torch.isfinite(frames).all()


class _Stopped(Exception):
    """Raised in place of a recipe's training, once its settings are seen."""


def test_the_other_train_nodes_give_their_recipes_the_noise_range(tmp_path, monkeypatch):
    """Train Subject and Motion LoRAs Jointly, Train DualReal and Train SynMotion draw within their noise_range."""
    import_pack()
    from custvid_pack.nodes import dualreal_nodes, synmotion_nodes, training_nodes, world_nodes
    from world_data import encode, world_training_inputs

    patcher, clip, subject, clips = world_training_inputs(tmp_path, training_nodes, world_nodes)
    seen = {}

    def stop(name, settings_at):
        def train(*args, **kwargs):
            seen[name] = [s.sigmas for s in settings_at(args)]
            raise _Stopped
        return train

    monkeypatch.setattr(training_nodes, "train_joint", stop("joint", lambda a: a[3:5]))
    monkeypatch.setattr(dualreal_nodes, "train_dualreal", stop("dualreal", lambda a: a[3:4]))
    monkeypatch.setattr(synmotion_nodes, "train_synmotion", stop("synmotion", lambda a: a[5:6]))
    ranges = dict(noise_range="high_noise", expert_boundary=EXPERT_BOUNDARY["i2v"])
    common = dict(steps=1, learning_rate=1e-3, timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False,
                  training_seed=0, checkpoint_every=100, **ranges)
    with pytest.raises(_Stopped):
        training_nodes.TrainJointLoRAs.execute(
            patcher, subject, clips, motion_probability=0.5, controller=False, groups=0, subject_rank=2, motion_rank=2,
            spatial_rank=0, stillness_rank=0, batch_size=1, subject_alignment_weight=0.0, motion_alignment_weight=0.0,
            alignment_block=1, preservation_weight=0.0, region_loss=False, region_margin=0, moving_share=0.0,
            debiased_weight=1.0, run_name="joint", **common)
    with pytest.raises(_Stopped):
        dualreal_nodes.TrainDualReal.execute(patcher, subject, clips, groups=2, bottleneck=4, motion_probability=0.5,
                                             residual="code", weighting="code", run_name="dualreal", **common)
    caption = "red circle moving right"
    scene = render(Scene(colour="red", shape="circle", direction="right"), WorldSpec())
    captioned = training_nodes.VideoDataset.execute(world_nodes.WorldVAE(), scene.frames, encode(clip, caption)).result[0]
    with pytest.raises(_Stopped):
        synmotion_nodes.TrainSynMotion.execute(patcher, captioned, clip, caption, subject_words="red circle",
                                               motion_words="moving right", rank=2, refiner=False, run_name="synmotion",
                                               **common)
    assert set(seen) == {"joint", "dualreal", "synmotion"}
    for name, samplers in seen.items():
        assert all((s.low, s.high) == (EXPERT_BOUNDARY["i2v"], 1.0) for s in samplers), (name, samplers)
