"""DualReal's nodes on the shapes world's model loaded by ComfyUI's own loader (in-process): trained through the
node, saved, loaded and applied to a MODEL clone that ComfyUI's samplers run; stacked with a stock LoRA, a LoRA
step schedule, box steering and the camera sampler; the StageBlender plot; and the refusals."""

import logging

import pytest
import torch
from comfy_host import import_comfy, import_pack, partially_loaded, tiny_world_wan
from world_data import encode, sample, weights, world_training_inputs

from custvid_core.control.boxes import BoxTrack

WIDTH = 12  # the image embeddings' width in these tests (a CLIP ViT-H gives 1024)
PROMPT = "orange star moving right"


def _vision(rows, seed):
    """What CLIP Vision Encode gives: ComfyUI's own output object, here with embeddings of our choosing (no CLIP
    vision model can be downloaded here)."""
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out["image_embeds"] = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed))
    return out


TRAIN = dict(steps=4, learning_rate=1e-2, groups=3, bottleneck=8, motion_probability=0.5, residual="code",
             weighting="code", timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False, training_seed=0,
             checkpoint_every=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import_comfy()
    pack = import_pack()
    from custvid_pack.nodes import dualreal_nodes, training_nodes, world_nodes

    base = tmp_path_factory.mktemp("dualreal")
    patcher, clip, subject, clips = world_training_inputs(base, training_nodes, world_nodes)
    model, dualreal, graph = dualreal_nodes.TrainDualReal.execute(
        patcher, subject, clips, run_name="dualreal_test", clips_image=_vision(2, 1), subject_image=_vision(1, 2),
        **TRAIN).result
    latent = world_nodes.WorldEmptyLatent.execute(5, 32, 1).result[0]
    return dict(pack=pack, nodes=dualreal_nodes, patcher=patcher, clip=clip, subject=subject, clips=clips,
                model=model, dualreal=dualreal, graph=graph, latent=latent, base=base)


def _sample(model, world, steps=3, seed=0):
    return sample(model, world["clip"], world["latent"], PROMPT, steps, seed)


def _no_hooks(patcher):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in patcher.model.diffusion_model.modules())


def test_trained_saved_loaded_and_applied_dualreal_samples_as_the_train_nodes_model(world):
    nodes, patcher = world["nodes"], world["patcher"]
    before_state, base = weights(patcher), _sample(patcher, world)
    trained_out = _sample(world["model"], world)
    assert world["graph"].shape[0] == 1 and world["graph"].shape[-1] == 3
    assert (world["base"] / "output" / "custvid_training" / "dualreal_test" / "checkpoint.pt").exists()
    assert not torch.allclose(trained_out, base, atol=1e-3)

    name = nodes.SaveDualReal.execute(world["dualreal"], "custvid/star_right", False).result[0]
    path = world["base"] / "dualreal" / "custvid" / "star_right.safetensors"
    assert name == "custvid/star_right.safetensors" and path.exists()
    saved = path.read_bytes()
    with pytest.raises(ValueError, match="filename: 'custvid/star_right.safetensors' already exists"):
        nodes.SaveDualReal.execute(world["dualreal"], "custvid/star_right", False)
    assert path.read_bytes() == saved
    loaded = nodes.LoadDualReal.execute(name).result[0]
    applied = nodes.ApplyDualReal.execute(patcher, loaded, 1.0, clip_vision_output=_vision(1, 2)).result[0]
    assert torch.allclose(_sample(applied, world), trained_out, atol=1e-5)

    # One call of the applied model computes what the library's parts compute on the same weights.
    import comfy.model_management

    from custvid_core.adapters.parts import attached
    from custvid_core.adapters.stage_blender import dualreal_parts
    from custvid_core.backbones import describe

    comfy.model_management.load_models_gpu([applied])
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 16, 1, 16, 16, generator=g), torch.tensor([0.7, 0.3])
    context = encode(world["clip"], PROMPT)[0][0].expand(2, -1, -1)
    with torch.no_grad():
        denoised = applied.model.apply_model(x, sigma, c_crossattn=context,
                                             transformer_options={"wrappers": applied.wrappers})
        parts = dualreal_parts(loaded)
        with attached(describe(patcher.model.diffusion_model), parts):
            parts[1].set_condition(_vision(1, 2)["image_embeds"])
            v = describe(patcher.model.diffusion_model).forward(x, sigma, context)
    assert torch.allclose(denoised, x - sigma.view(-1, 1, 1, 1, 1) * v, atol=1e-4)

    # Strength 0 leaves the model as it was; another reference image changes what the motion adapters add.
    off = nodes.ApplyDualReal.execute(patcher, loaded, 0.0, clip_vision_output=_vision(1, 2)).result[0]
    assert torch.allclose(_sample(off, world), base, atol=1e-5)
    other = nodes.ApplyDualReal.execute(patcher, loaded, 1.0, clip_vision_output=_vision(1, 9)).result[0]
    assert not torch.allclose(_sample(other, world), trained_out, atol=1e-4)

    # The user's MODEL: same weights, no wrappers or hooks left, same output.
    after = weights(patcher)
    assert all(torch.equal(after[k], before_state[k]) for k in before_state)
    assert not any("custvid_dualreal" in str(w) for w in patcher.wrappers.values())
    assert _no_hooks(patcher)
    assert torch.equal(_sample(patcher, world), base)


def test_training_leaves_no_gradient_on_the_users_model(world):
    assert all(p.grad is None for p in world["patcher"].model.diffusion_model.parameters())


def test_an_applied_dualreal_builds_its_modules_once_for_all_its_samplings(world, monkeypatch):
    """Apply DualReal attaches the parts for every model call; their modules are built on the first call only."""
    import importlib

    built = []
    for name in ("dualreal", "stage_blender"):
        module = importlib.import_module(f"custvid_pack.custvid_core.adapters.{name}")

        def counting(make, _original=module.built_unseeded):
            built.append(make)
            return _original(make)

        monkeypatch.setattr(module, "built_unseeded", counting)
    applied = world["nodes"].ApplyDualReal.execute(world["patcher"], world["dualreal"], 1.0,
                                                   clip_vision_output=_vision(1, 2)).result[0]
    first, second = _sample(applied, world, steps=3), _sample(applied, world, steps=3)
    assert len(built) == 3  # identity adapters, motion adapters, controller: for 2 samplings of 3 steps
    assert torch.equal(first, second)
    assert torch.allclose(first, _sample(world["model"], world, steps=3), atol=1e-5)


def _stock_lora(world):
    """A random LoRA on every block's ffn.0 in ComfyUI's native keys, loaded by the stock LoraLoaderModelOnly."""
    from safetensors.torch import save_file

    import nodes as comfy_nodes

    g = torch.Generator().manual_seed(4)
    tensors = {}
    for b in range(6):
        key = f"diffusion_model.blocks.{b}.ffn.0"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 128, generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(512, 4, generator=g) * 0.2
    (world["base"] / "loras").mkdir(exist_ok=True)
    save_file(tensors, str(world["base"] / "loras" / "random_ffn.safetensors"))
    return lambda model: comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "random_ffn.safetensors",
                                                                                1.0)[0]


def test_stacked_with_a_stock_lora_both_act_in_either_order(world, caplog):
    nodes, patcher = world["nodes"], world["patcher"]
    with caplog.at_level(logging.WARNING):
        lora = _stock_lora(world)
        lora_only = lora(patcher)
    assert "lora key not loaded" not in caplog.text

    def dualreal(model):
        return nodes.ApplyDualReal.execute(model, world["dualreal"], 1.0, clip_vision_output=_vision(1, 2)).result[0]

    base, with_lora, with_dualreal = _sample(patcher, world), _sample(lora_only, world), _sample(dualreal(patcher), world)
    both, both_other_order = _sample(lora(dualreal(patcher)), world), _sample(dualreal(lora_only), world)
    assert torch.allclose(both, both_other_order, atol=1e-5)
    for alone in (base, with_lora, with_dualreal):
        assert not torch.allclose(both, alone, atol=1e-3)
    assert not torch.allclose(with_lora, base, atol=1e-3)


def test_with_low_vram_partial_loading_it_samples_as_fully_loaded(world):
    """ComfyUI's partial loading (weights cast per layer with their LoRA patches) under the attached adapters."""

    nodes, patcher = world["nodes"], world["patcher"]
    applied = nodes.ApplyDualReal.execute(_stock_lora(world)(patcher), world["dualreal"], 1.0,
                                          clip_vision_output=_vision(1, 2)).result[0]
    full = _sample(applied, world)
    with partially_loaded(patcher) as lowvram_layers:  # what a small GPU does
        low = _sample(applied, world)
    assert lowvram_layers, "the partial load did not leave any layer to be cast on the fly"
    assert torch.allclose(low, full, atol=1e-4)
    assert not torch.allclose(full, _sample(patcher, world), atol=1e-3)


def test_with_a_lora_step_schedule_box_steering_and_the_camera_sampler_it_runs_and_acts(world):
    from custvid_pack.nodes import control_nodes, schedule_nodes

    nodes, patcher = world["nodes"], world["patcher"]
    lora = _stock_lora(world)  # writes the file
    del lora

    def chain(model, with_dualreal):
        model = schedule_nodes.ApplyLoRASchedule.execute(model, "random_ffn.safetensors", "custom",
                                                         "0:0.5, 0.5:1.0").result[0]
        if with_dualreal:
            model = nodes.ApplyDualReal.execute(model, world["dualreal"], 1.0,
                                                clip_vision_output=_vision(1, 2)).result[0]
        model = control_nodes.BoxSteeringNode.execute(model, BoxTrack.parse("0: 0, 0, 0.5, 0.5"), PROMPT, "star", 10.0,
                                                      0.5, "all", "", clip=world["clip"]).result[0]
        positive, negative = encode(world["clip"], PROMPT), encode(world["clip"], "")
        return control_nodes.CameraSampleV2.execute(model, positive, negative, world["latent"], 0, 4, 3.0, "euler",
                                                    "simple", 0.25, 0.0, 1.0, "", 0.25, 0.75, 0).result[0]["samples"]

    with_dualreal, without = chain(patcher, True), chain(patcher, False)
    assert with_dualreal.shape == world["latent"]["samples"].shape and torch.isfinite(with_dualreal).all()
    assert not torch.allclose(with_dualreal, without, atol=1e-3)
    assert _no_hooks(patcher)


def test_the_stageblender_plot_draws_one_curve_per_group_over_the_steps(world):
    from custvid_core.adapters.stage_blender import dualreal_parts, weights_over_steps
    from custvid_core.backbones import describe

    nodes, patcher = world["nodes"], world["patcher"]
    conditioning = encode(world["clip"], PROMPT)
    plot = nodes.StageBlenderPlot.execute(patcher, world["dualreal"], conditioning, world["latent"], 5, 0,
                                          clip_vision_output=_vision(1, 2)).result[0]
    assert plot.shape == (1, 256, 512, 3)
    colours = {tuple(c) for c in (plot[0] * 255).round().int().reshape(-1, 3).tolist()}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours  # the three groups' curves

    # The weights it draws: one row per step and group, moving with the noise level.
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    backbone = describe(patcher.model.diffusion_model)
    noise = torch.randn(1, 16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = weights_over_steps(backbone, dualreal_parts(world["dualreal"]), noise, torch.linspace(1, 0, 6),
                                 conditioning[0][0], _vision(1, 2)["image_embeds"])
    assert weights.shape == (5, 3) and ((weights > 0) & (weights < 0.2)).all()
    assert not torch.allclose(weights[0], weights[-1])
    assert _no_hooks(patcher)


def test_bad_dualreal_input_is_refused_with_the_input_named(world, tmp_path):
    from safetensors.torch import save_file

    nodes, patcher = world["nodes"], world["patcher"]
    apply = nodes.ApplyDualReal.execute
    with pytest.raises(ValueError, match="clip_vision_output: is not connected, and this DualReal was trained with"):
        apply(patcher, world["dualreal"], 1.0)
    wide = _vision(1, 2)
    wide["image_embeds"] = torch.randn(1, WIDTH + 1)
    with pytest.raises(ValueError, match=f"clip_vision_output: embeddings of width {WIDTH + 1}"):
        apply(patcher, world["dualreal"], 1.0, clip_vision_output=wide)
    with pytest.raises(ValueError, match="dualreal: is not a DualReal"):
        apply(patcher, {"lora": torch.zeros(1)}, 1.0)
    small, _, _ = tiny_world_wan(tmp_path)  # 2 blocks
    with pytest.raises(ValueError, match="dualreal: made for a model with blocks 6"):
        apply(small, world["dualreal"], 1.0, clip_vision_output=_vision(1, 2))

    # A file of another kind in the folder.
    (world["base"] / "dualreal").mkdir(exist_ok=True)  # where no earlier test saved one
    save_file({"x": torch.zeros(1)}, str(world["base"] / "dualreal" / "not_dualreal.safetensors"))
    with pytest.raises(ValueError, match="dualreal_name: 'not_dualreal.safetensors' is not a DualReal file"):
        nodes.LoadDualReal.execute("not_dualreal.safetensors")

    # Training: more groups than blocks, one CLIP vision input without the other; no run folder is written.
    train = nodes.TrainDualReal.execute
    runs = world["base"] / "output" / "custvid_training"
    with pytest.raises(ValueError, match="groups: 9 groups of blocks"):
        train(patcher, world["subject"], world["clips"], run_name="too_many_groups", **{**TRAIN, "groups": 9})
    with pytest.raises(ValueError, match="subject_image: is not connected while the other"):
        train(patcher, world["subject"], world["clips"], run_name="one_image", clips_image=_vision(2, 1), **TRAIN)
    with pytest.raises(ValueError, match="image_embeddings: clips: shape"):
        train(patcher, world["subject"], world["clips"], run_name="three_images", clips_image=_vision(3, 1),
              subject_image=_vision(1, 2), **TRAIN)
    with pytest.raises(ValueError, match="controller_learning_rate: 2.0"):
        train(patcher, world["subject"], world["clips"], run_name="fast_controller", controller_learning_rate=2.0,
              **TRAIN)
    assert not any((runs / name).exists() for name in ("too_many_groups", "one_image", "three_images",
                                                       "fast_controller"))


def test_more_bad_dualreal_input_is_refused_with_the_input_named(world, tmp_path):
    """The rest of the issue's list: another model width, image embeddings where none were trained (and none where
    they were, at the plot), two widths in training, a damaged file."""
    import json

    import comfy.sd
    from comfy_host import tiny_world
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from custvid_core.world.model import save_world

    nodes, patcher = world["nodes"], world["patcher"]
    save_world(tiny_world(6, num_attention_heads=2), tmp_path / "narrow.safetensors", tmp_path / "text.safetensors")
    narrow = comfy.sd.load_diffusion_model(str(tmp_path / "narrow.safetensors"))  # 6 blocks, as the world
    with pytest.raises(ValueError, match="dualreal: made for a model with dim 128, and this one has dim 256"):
        nodes.ApplyDualReal.execute(narrow, world["dualreal"], 1.0, clip_vision_output=_vision(1, 2))

    without_images = nodes.TrainDualReal.execute(patcher, world["subject"], world["clips"], run_name="no_images",
                                                 **{**TRAIN, "steps": 1}).result[1]
    with pytest.raises(ValueError, match="clip_vision_output: is connected, and this DualReal was trained without"):
        nodes.ApplyDualReal.execute(patcher, without_images, 1.0, clip_vision_output=_vision(1, 2))
    with pytest.raises(ValueError, match="clip_vision_output: is not connected, and this DualReal was trained with"):
        nodes.StageBlenderPlot.execute(patcher, world["dualreal"], encode(world["clip"], PROMPT), world["latent"], 3, 0)

    wider = _vision(1, 2)
    wider["image_embeds"] = torch.randn(1, WIDTH + 1)
    with pytest.raises(ValueError, match=rf"image_embeddings: widths {WIDTH} \(clips\) and {WIDTH + 1} \(subject\)"):
        nodes.TrainDualReal.execute(patcher, world["subject"], world["clips"], run_name="two_widths",
                                    clips_image=_vision(2, 1), subject_image=wider, **TRAIN)
    assert not (world["base"] / "output" / "custvid_training" / "two_widths").exists()

    # A DualReal file whose description of its parts was cut short: refused where it is loaded.
    saved = world["base"] / "dualreal" / "custvid" / "damaged.safetensors"
    nodes.SaveDualReal.execute(world["dualreal"], "custvid/damaged", False)
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    description = json.loads(meta["custvid.dualreal"])
    del description["motion"]["spec"]
    save_file(load_file(saved), str(saved), metadata={**meta, "custvid.dualreal": json.dumps(description)})
    with pytest.raises(ValueError, match="dualreal_name: its description of the parts is damaged"):
        nodes.LoadDualReal.execute("custvid/damaged.safetensors")


def test_the_memory_savings_learn_the_same_dualreal(world, monkeypatch):
    """Checkpointing every other block with its activations offloaded and the last block swapped learn the adapters
    and controller the plain run learns (to float rounding): they move data, not what is computed."""
    nodes = world["nodes"]
    backbone_class, used = world["pack"].custvid_core.backbones.wan.WanBackbone, []
    training_memory = backbone_class.training_memory
    monkeypatch.setattr(backbone_class, "training_memory",
                        lambda self, checkpointing, memory, device: used.append(memory) or training_memory(
                            self, checkpointing, memory, device))
    settings = {**TRAIN, "steps": 3, "gradient_checkpointing": True}
    _, plain, _ = nodes.TrainDualReal.execute(world["patcher"], world["subject"], world["clips"],
                                              run_name="mem_plain", **settings).result
    _, saved, _ = nodes.TrainDualReal.execute(world["patcher"], world["subject"], world["clips"],
                                              run_name="mem_saving", recompute_every=2, offload_activations=True,
                                              blocks_to_swap=1, **settings).result
    assert [(m.recompute_every, m.offload_activations, m.blocks_to_swap) for m in used] == [(1, False, 0), (2, True, 1)]
    tensors = {role: part.tensors for role, part in plain.parts.items()}
    assert tensors.keys() == saved.parts.keys() and len(tensors) == 3
    for role, part in saved.parts.items():
        assert part.tensors.keys() == tensors[role].keys()
        assert all(torch.allclose(tensors[role][k], v, atol=1e-5) for k, v in part.tensors.items()), role


def test_the_world_dualreal_workflow_trains_saves_plots_and_generates(comfy_server):
    """The shipped world DualReal workflow, shortened (4 training steps, 2 sampling and 3 plot steps), end to end
    through a real server: its links type-check, it trains on both kinds of step, saves, plots and saves a video."""
    from workflow_api import check_links, shipped, to_api

    workflow = shipped("11")
    info = comfy_server.object_info()
    assert not check_links(workflow, info)
    prompt = to_api(workflow, info)
    for node in prompt.values():
        if node["class_type"] == "CustVid_TrainDualReal":
            node["inputs"].update(steps=4, run_name="world_dualreal_host_test")
        if node["class_type"] in ("KSampler", "CustVid_StageBlenderPlot"):
            node["inputs"]["steps"] = 2 if node["class_type"] == "KSampler" else 3
    result = comfy_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    assert (comfy_server.base / "models" / "custvid" / "dualreal" / "custvid" / "world_dualreal.safetensors").exists()
    assert list((comfy_server.base / "output" / "custvid").glob("world_dualreal*"))
    checkpoint = comfy_server.base / "output" / "custvid_training" / "world_dualreal_host_test" / "checkpoint.pt"
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert len(history) == 4 and {"motion", "identity"} <= {k for r in history for k in r}
    previews = [im for o in result["outputs"].values() for im in o.get("images", []) if im["type"] == "temp"]
    assert len(previews) == 2  # the loss graph and the StageBlender plot
