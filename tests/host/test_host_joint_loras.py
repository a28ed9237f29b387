"""Train Subject and Motion LoRAs Jointly on the shapes world's model loaded by ComfyUI's own loader (in-process):
the two LoRAs it outputs save through Save LoRA and load in the stock LoraLoaderModelOnly, each changing the output;
without the controller its MODEL is the two LoRAs at 1.0; with it, every model call runs the LoRAs weighed by the
trained controller, as the library's parts compute; its dualreal output saves through Save DualReal and, loaded by Load
DualReal, Apply DualReal gives what its MODEL gives; the input MODEL is left as it was; bad input is refused."""

import pytest
import torch
from comfy_host import import_comfy, import_pack, partially_loaded, tiny_world_wan
from world_data import encode, sample, weights, world_training_inputs

PROMPT = "sks moving right"
TRAIN = dict(steps=6, learning_rate=1e-2, motion_probability=0.5, groups=3, subject_rank=4, motion_rank=4,
             spatial_rank=0, stillness_rank=0, batch_size=1, subject_alignment_weight=0.0, motion_alignment_weight=0.0,
             alignment_block=1, preservation_weight=1.0, region_loss=True, region_margin=0, moving_share=0.5,
             debiased_weight=1.0, timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False,
             training_seed=0, checkpoint_every=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import_comfy()
    pack = import_pack()
    from custvid_pack.nodes import dualreal_nodes, training_nodes, world_nodes

    base = tmp_path_factory.mktemp("joint")
    patcher, clip, subject, clips = world_training_inputs(base, training_nodes, world_nodes)
    latent = world_nodes.WorldEmptyLatent.execute(5, 32, 1).result[0]
    world = dict(pack=pack, nodes=training_nodes, dualreal_nodes=dualreal_nodes, patcher=patcher, clip=clip,
                 subject=subject, clips=clips, latent=latent, base=base)
    world["before"] = weights(patcher)
    world["plain"] = _train(world, "joint_plain", controller=False)
    world["controlled"] = _train(world, "joint_controlled", controller=True)
    return world


def _train(world, run_name, **kw):
    return world["nodes"].TrainJointLoRAs.execute(world["patcher"], world["subject"], world["clips"],
                                                  run_name=run_name, **{**TRAIN, **kw}).result


def _sample(model, world, steps=3, seed=0):
    return sample(model, world["clip"], world["latent"], PROMPT, steps, seed)


def _untouched(world):
    """The user's MODEL as it was: its weights (with no other MODEL's patches loaded), no wrappers, patches, hooks
    or LoRA layers."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # a loaded clone's stock LoRAs sit in the shared weights
    patcher = world["patcher"]
    after = weights(patcher)
    return (after.keys() == world["before"].keys() and all(torch.equal(after[k], world["before"][k]) for k in after)
            and not patcher.wrappers and not patcher.patches
            and not any(m._forward_hooks or m._forward_pre_hooks for m in patcher.model.diffusion_model.modules())
            and not any("lora" in n for n, _ in patcher.model.diffusion_model.named_modules()))


def _stock_loaded(world, model, names, strength=1.0):
    import nodes as comfy_nodes

    for name in names:
        model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
    return model


def test_the_saved_loras_load_in_the_stock_loader_and_each_changes_the_output(world):
    nodes, patcher = world["nodes"], world["patcher"]
    model, subject_lora, motion_lora, graph, _ = world["plain"]
    assert graph.shape[0] == 1 and graph.shape[-1] == 3
    assert subject_lora.spec.name == "subject" and motion_lora.spec.name == "motion"
    assert subject_lora.trigger_words == world["subject"].trigger_words
    names = [nodes.SaveLoRA.execute(lora, f"custvid/joint_{lora.spec.name}", "sks", False).result[0]
             for lora in (subject_lora, motion_lora)]
    assert all((world["base"] / "loras" / name).exists() for name in names)
    base, trained = _sample(patcher, world), _sample(model, world)
    subject_only, motion_only = (_sample(_stock_loaded(world, patcher, [name]), world) for name in names)
    both = _sample(_stock_loaded(world, patcher, names), world)
    for alone in (subject_only, motion_only):
        assert not torch.allclose(alone, base, atol=1e-3)
    assert not torch.allclose(subject_only, motion_only, atol=1e-3)
    assert torch.allclose(both, trained, atol=1e-5)  # the node's MODEL: both LoRAs at 1.0
    assert (world["base"] / "output" / "custvid_training" / "joint_plain" / "checkpoint.pt").exists()
    assert _untouched(world) and torch.equal(_sample(patcher, world), base)


def test_with_the_controller_its_model_runs_the_loras_weighed_and_leaves_the_model_alone(world):
    patcher = world["patcher"]
    model, subject_lora, motion_lora, _, _ = world["controlled"]
    names = [world["nodes"].SaveLoRA.execute(lora, f"custvid/controlled_{lora.spec.name}", "", False).result[0]
             for lora in (subject_lora, motion_lora)]
    base, stock = _sample(patcher, world), _sample(_stock_loaded(world, patcher, names), world)
    controlled = _sample(model, world)
    assert not torch.allclose(controlled, stock, atol=1e-4)  # the trained controller moved off 1.0 each
    assert not torch.allclose(controlled, base, atol=1e-3)
    assert torch.equal(_sample(model, world), controlled)
    assert _untouched(world) and torch.equal(_sample(patcher, world), base)


KNOWN_BIAS = torch.tensor([-1.0, 0.5, 2.0])


def _controlled(world, model):
    """The node's controlled MODEL over `model`, with the joint run's LoRAs and a controller whose weights are known:
    it ignores the tokens (its last layer's weights are zero) and gives group g the subject weight
    2 * sigmoid(KNOWN_BIAS[g])."""
    from custvid_core.adapters.dualreal import DualRealWeights
    from custvid_core.adapters.lora import LoraPart
    from custvid_core.adapters.parts import attached
    from custvid_core.adapters.stage_blender import LORA_WEIGHTING, StageBlenderPart
    from custvid_core.backbones import describe

    _, subject_lora, motion_lora, _, pair = world["plain"]
    with torch.no_grad():
        parts = [LoraPart(subject_lora.spec, tensors=subject_lora), LoraPart(motion_lora.spec, tensors=motion_lora)]
        weigher = StageBlenderPart("c", *parts, groups=3, weighting=LORA_WEIGHTING)
        with attached(describe(world["patcher"].model.diffusion_model), [*parts, weigher]):
            weigher.module.fuse[-1].bias.copy_(KNOWN_BIAS)
            controller = weigher.export()
    return world["nodes"]._controlled_model(model, DualRealWeights({**pair.parts, "controller": controller}))


def test_a_controlled_model_call_weighs_each_lora_per_group_of_blocks(world):
    """The MODEL a controller makes, on a controller whose weights are known (it ignores the tokens: 2w per group
    from its last layer's bias), computes one model call as the library does with the LoRAs at those strengths per
    block (peft's own scaling, not the controller's hooks)."""
    import comfy.model_management

    from custvid_core.adapters.lora import LoraPart
    from custvid_core.adapters.parts import attached
    from custvid_core.adapters.stage_blender import block_groups
    from custvid_core.backbones import describe

    patcher = world["patcher"]
    _, subject_lora, motion_lora, _, pair = world["plain"]
    backbone = describe(patcher.model.diffusion_model)
    model = _controlled(world, patcher)
    parts = [LoraPart(subject_lora.spec, tensors=subject_lora), LoraPart(motion_lora.spec, tensors=motion_lora)]
    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 16, 1, 16, 16, generator=g), torch.tensor([0.7, 0.3])
    context = torch.cat([encode(world["clip"], PROMPT)[0][0], encode(world["clip"], "")[0][0]])
    w = 2 * torch.sigmoid(KNOWN_BIAS)[block_groups(3, backbone.num_blocks)]
    with torch.no_grad():
        denoised = model.model.apply_model(x, sigma, c_crossattn=context,
                                           transformer_options={"wrappers": model.wrappers})
        with attached(backbone, parts):
            parts[0].set_strength(w)
            parts[1].set_strength(2 - w)
            v = backbone.forward(x, sigma, context)
            parts[0].set_strength(1.0)
            parts[1].set_strength(1.0)
            at_one = backbone.forward(x, sigma, context)
    comfy.model_management.unload_all_models()
    assert torch.allclose(denoised, x - sigma.view(-1, 1, 1, 1, 1) * v, atol=1e-4)
    assert not torch.allclose(denoised, x - sigma.view(-1, 1, 1, 1, 1) * at_one, atol=1e-3)
    assert _untouched(world)


def _stock_lora(world):
    """A random LoRA on every block's ffn.0 (where both trained LoRAs also sit), for the stock LoraLoaderModelOnly."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    tensors = {}
    for b in range(6):
        key = f"diffusion_model.blocks.{b}.ffn.0"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 128, generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(512, 4, generator=g) * 0.2
    (world["base"] / "loras").mkdir(exist_ok=True)
    save_file(tensors, str(world["base"] / "loras" / "random_ffn.safetensors"))
    return lambda model: _stock_loaded(world, model, ["random_ffn.safetensors"])


def test_the_controlled_model_stacks_with_a_stock_lora_and_samples_the_same_partially_loaded(world):
    """The LoRAs attached per call sit on layers a stock LoRA patches too: both act, in either order, and ComfyUI's
    partial loading (weights cast per layer with their patches) gives what full loading gives."""

    patcher = world["patcher"]
    stock = _stock_lora(world)
    base, controlled, stock_only = _sample(patcher, world), _sample(_controlled(world, patcher), world), \
        _sample(stock(patcher), world)
    both = _sample(stock(_controlled(world, patcher)), world)
    assert torch.allclose(_sample(_controlled(world, stock(patcher)), world), both, atol=1e-5)
    for alone in (base, controlled, stock_only):
        assert not torch.allclose(both, alone, atol=1e-3)

    with partially_loaded(patcher) as lowvram_layers:  # what a small GPU does
        low = _sample(stock(_controlled(world, patcher)), world)
    assert lowvram_layers, "the partial load did not leave any layer to be cast on the fly"
    assert torch.allclose(low, both, atol=1e-4)
    assert _untouched(world)


def test_bad_joint_input_is_refused_with_the_input_named(world):
    with pytest.raises(ValueError, match="groups"):
        _train(world, "joint_bad_groups", controller=True, groups=7)  # the world has 6 blocks
    with pytest.raises(ValueError, match="motion_probability"):
        _train(world, "joint_bad_probability", controller=False, motion_probability=1.0)
    assert not (world["base"] / "output" / "custvid_training" / "joint_bad_groups" / "checkpoint.pt").exists()
    assert _untouched(world)


def _saved_and_loaded(world, pair, name):
    dualreal = world["dualreal_nodes"]
    saved = dualreal.SaveDualReal.execute(pair, f"custvid/{name}", False).result[0]
    return dualreal.LoadDualReal.execute(saved).result[0]


def test_the_controlled_pair_saves_loads_and_applies_as_the_node_s_model(world):
    """The dualreal output (the LoRAs and the trained controller) through Save DualReal and Load DualReal: Apply
    DualReal on the input MODEL samples what the node's own MODEL samples; the plot draws its controller."""
    dualreal, patcher = world["dualreal_nodes"], world["patcher"]
    model, _, _, _, pair = world["controlled"]
    loaded = _saved_and_loaded(world, pair, "joint_controlled")
    assert sorted(loaded.parts) == ["controller", "identity", "motion"]
    applied = dualreal.ApplyDualReal.execute(patcher, loaded, 1.0).result[0]
    base, node_model = _sample(patcher, world), _sample(model, world)
    assert torch.allclose(_sample(applied, world), node_model, atol=1e-6)
    assert not torch.allclose(node_model, base, atol=1e-3)
    halved = _sample(dualreal.ApplyDualReal.execute(patcher, loaded, 0.5).result[0], world)
    assert not torch.allclose(halved, node_model, atol=1e-4) and not torch.allclose(halved, base, atol=1e-4)
    plot = dualreal.StageBlenderPlot.execute(patcher, loaded, encode(world["clip"], PROMPT), world["latent"], 3,
                                             0).result[0]
    assert plot.ndim == 4 and plot.shape[-1] == 3
    assert _untouched(world) and torch.equal(_sample(patcher, world), base)


def test_a_pair_without_controller_applies_both_loras_at_the_strength_given(world):
    """Without the controller the dualreal output is the two LoRAs: Apply DualReal at 1.0 samples what the node's
    MODEL (both LoRAs by ComfyUI's own loading) samples; the plot refuses it, having no controller to draw."""
    dualreal, patcher = world["dualreal_nodes"], world["patcher"]
    model, _, _, _, pair = world["plain"]
    loaded = _saved_and_loaded(world, pair, "joint_plain")
    assert sorted(loaded.parts) == ["identity", "motion"]
    applied = _sample(dualreal.ApplyDualReal.execute(patcher, loaded, 1.0).result[0], world)
    # LoRAs run beside the weights, against ComfyUI's merged into them: equal up to rounding (the LoRAs move it by ~6).
    assert torch.allclose(applied, _sample(model, world), atol=1e-4)
    off = _sample(dualreal.ApplyDualReal.execute(patcher, loaded, 0.0).result[0], world)
    assert torch.allclose(off, _sample(patcher, world), atol=1e-5)
    with pytest.raises(ValueError, match="dualreal: has no StageBlender controller"):
        dualreal.StageBlenderPlot.execute(patcher, loaded, encode(world["clip"], PROMPT), world["latent"], 3, 0)
    assert _untouched(world)


def test_a_bad_pair_file_or_model_is_refused_naming_the_input(world, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dualreal = world["dualreal_nodes"]
    pair = world["controlled"][4]
    saved = world["base"] / "dualreal" / "custvid" / "cut_pair.safetensors"
    dualreal.SaveDualReal.execute(pair, "custvid/cut_pair", False)
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(saved)
    del tensors[next(k for k in tensors if k.startswith("motion.") and k.endswith(".lora_up.weight"))]
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(ValueError, match="dualreal_name: its LoRA 'dualreal_motion' is incomplete"):
        dualreal.LoadDualReal.execute("custvid/cut_pair.safetensors")
    small, _, _ = tiny_world_wan(tmp_path)  # 2 blocks
    with pytest.raises(ValueError, match="dualreal: made for a model with blocks 6"):
        dualreal.ApplyDualReal.execute(small, pair, 1.0)
    assert _untouched(world)
