"""The Wan files ComfyUI distributes, in every precision: a tiny Wan saved as fp32, fp16, bf16, fp8_e4m3fn and in
ComfyUI's scaled-fp8 layout (`scaled_fp8` marker, fp8 weights with a `.scale_weight` each, as Wan 2.2's
`*_fp8_scaled` files), loaded by ComfyUI's own UNETLoader with each weight_dtype. Training follows the fp32 run
and never changes how the base is stored; the LoRA trained on one precision loads through the stock loader on
another and changes its output as on fp32; the step schedule, box steering and the camera run on fp8 bases."""

import json
import math
from dataclasses import replace

import pytest
import torch
from comfy_host import import_pack, tiny_world
from safetensors.torch import load_file, save_file

from custvid_core.control.boxes import BoxTrack
from custvid_core.training import OptimSettings, SigmaSampler, SubjectSettings, train_subject
from custvid_core.world.model import save_world
from custvid_core.world.text import WorldTextEncoder

PRECISIONS = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_scaled")
FP8_MAX = 448.0  # float8_e4m3fn's largest value
# (file, how it is loaded, training_dtype). How it is loaded: UNETLoader's weight_dtype; "stored": the file's
# 16-bit weights kept as they are (on a CPU ComfyUI's default loads them as fp32), computed in fp32 by ComfyUI's
# manual cast; "as on a GPU": kept and computed in 16 bits with ComfyUI's plain (non-casting) layers, as on a GPU
# that supports the dtype, so training in another dtype needs the layers to cast.
CASES = [("fp32", "default", "auto"), ("fp16", "default", "auto"), ("bf16", "default", "auto"),
         ("fp8_e4m3fn", "default", "auto"), ("fp8_scaled", "default", "auto"), ("fp16", "stored", "auto"),
         ("bf16", "stored", "auto"), ("fp16", "as on a GPU", "auto"), ("bf16", "as on a GPU", "auto"),
         ("fp32", "fp8_e4m3fn", "auto"), ("fp16", "fp8_e4m3fn_fast", "auto"), ("bf16", "fp8_e5m2", "auto"),
         ("fp8_scaled", "fp8_e4m3fn", "auto"),
         ("fp32", "fp8_e4m3fn", "bf16"), ("fp8_scaled", "default", "bf16"), ("bf16", "as on a GPU", "bf16"),
         ("fp8_scaled", "fp8_e4m3fn", "fp16"), ("fp16", "as on a GPU", "fp16")]
REFERENCE = ("fp32", "default", "auto")
STEPS = 6
# Losses of the same seeded run on every precision stay within 2% of fp32's (seen: 0.3% at most; fp8's
# rounding of the base is the largest difference).
LOSS_TOLERANCE = 0.02
SETTINGS = SubjectSettings(rank=4, roles=("self_attn.q", "self_attn.k", "ffn.0"), alignment_weight=0.0,
                           sigmas=SigmaSampler("uniform"), gradient_checkpointing=True,
                           optim=OptimSettings(steps=STEPS, lr=1e-3, warmup=0))
# A LoRA with an effect well above fp8's rounding of the base (a merged LoRA is rounded into fp8 weights with
# the base: seen here, the change a 6-step 1e-3 LoRA makes is lost in that rounding on every fp8 target).
TRANSFERRED = replace(SETTINGS, optim=OptimSettings(steps=10, lr=1e-2, warmup=0))


def _scaled_fp8(sd: dict) -> dict:
    """ComfyUI's scaled-fp8 layout: each block's linear weight as fp8 over its `.scale_weight`, the rest in bf16,
    and the `scaled_fp8` marker ComfyUI's loader looks for."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().float() / FP8_MAX
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.bfloat16)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The tiny Wan in every precision in a diffusion_models folder, the world (text encoder, VAE) and the pack."""
    pack = import_pack()
    import folder_paths

    folder = tmp_path_factory.mktemp("precisions")
    world = tiny_world()
    save_world(world, folder / "tiny_wan_fp32.safetensors", folder / "tiny_text.safetensors")
    sd = load_file(folder / "tiny_wan_fp32.safetensors")
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        save_file({k: v.to(dtype) for k, v in sd.items()}, folder / f"tiny_wan_{precision}.safetensors")
    save_file(_scaled_fp8(sd), folder / "tiny_wan_fp8_scaled.safetensors")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    world.text = WorldTextEncoder()
    return folder, world, pack


def _load(precision: str, weight_dtype: str):
    """The file loaded as ComfyUI loads it when a graph runs (under inference mode)."""
    import comfy.ops
    import comfy.sd
    import folder_paths

    import nodes

    name = f"tiny_wan_{precision}.safetensors"
    with torch.inference_mode():
        if weight_dtype in ("stored", "as on a GPU"):
            options = {"dtype": {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]}
            if weight_dtype == "as on a GPU":
                options["custom_operations"] = comfy.ops.disable_weight_init
            return comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", name),
                                                 model_options=options)
        return nodes.UNETLoader().load_unet(name, weight_dtype)[0]


def _storage(model: torch.nn.Module) -> dict:
    """How many base tensors are stored as what (tensor class, storage dtype); LoRA layers left out."""
    counts = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = (type(p.data).__name__, getattr(p, "_qdata", p).dtype)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _subject(world, pack):
    from custvid_pack.nodes import training_nodes, world_nodes
    from world_data import star_photos

    images, masks = star_photos(3)
    with torch.no_grad():
        conditioning = [[world.text(["sks star"]), {}]]
    return training_nodes.SubjectDataset.execute(world_nodes.WorldVAE(), images, conditioning, masks=masks).result[0]


def _train(patcher, subject, training_dtype="auto", settings=SETTINGS):
    """A few seeded training steps through the host glue; returns the run and the base's storage before,
    during every step, and after."""
    from custvid_pack.nodes.host import resolve_training_dtype, training_backbone
    from custvid_pack.nodes.training_nodes import _data_in

    before, during = _storage(patcher.model.diffusion_model), []
    with training_backbone(patcher) as (backbone, device, to_model):
        trained = train_subject(backbone, _data_in(to_model, subject), settings, device=device,
                                progress=lambda *_: during.append(_storage(backbone.model)),
                                dtype=resolve_training_dtype(training_dtype, device))
    return trained, before, during, _storage(patcher.model.diffusion_model)


def _denoise(patcher):
    import comfy.model_management

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 32, 32, generator=g)
    context = torch.randn(1, 16, 4096, generator=g)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=context).float()


@pytest.fixture(scope="module")
def trained(wan):
    """Every case trained on the same data and seed: (precision, weight_dtype) -> (run, storage before/during/after)."""
    _, world, pack = wan
    subject = _subject(world, pack)
    runs = {case: _train(_load(*case[:2]), subject, case[2]) for case in CASES}
    reference = [r["loss"] for r in runs[REFERENCE][0].history]
    print(f"\nprecision / weight_dtype / training_dtype -> loss after {STEPS} steps vs fp32 ({reference[-1]:.4f}); "
          "largest deviation over the steps")
    for (precision, weight_dtype, dtype), (run, *_) in runs.items():
        losses = [r["loss"] for r in run.history]
        worst = max(abs(a - b) / b for a, b in zip(losses, reference))
        print(f"{precision:>10} / {weight_dtype:<15} / {dtype:<4} -> {losses[-1]:.4f} "
              f"({losses[-1] / reference[-1] - 1:+.2%}); max {worst:.2%}")
    return runs


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_training_follows_fp32_and_never_changes_how_the_base_is_stored(trained, case):
    run, before, during, after = trained[case]
    losses = [r["loss"] for r in run.history]
    reference = [r["loss"] for r in trained[REFERENCE][0].history]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert all(abs(a - b) <= LOSS_TOLERANCE * b for a, b in zip(losses, reference)), (losses, reference)
    # Not upcast, not converted: the base keeps its fp8 / quantized / 16-bit storage during training and after.
    assert all(d == before for d in during) and after == before
    assert all(v.dtype == torch.float32 for v in run.tensors.values())


def test_the_weights_stay_as_comfyui_loaded_them(trained):
    """The cases differ where it matters: fp8 stays fp8, scaled fp8 stays quantized, 16-bit stays 16-bit."""
    def kinds(*case):
        return set(trained[(*case, "auto")][1])

    assert ("Tensor", torch.float8_e4m3fn) in kinds("fp32", "fp8_e4m3fn")
    assert ("Tensor", torch.float8_e5m2) in kinds("bf16", "fp8_e5m2")
    assert ("QuantizedTensor", torch.float8_e4m3fn) in kinds("fp8_scaled", "default")
    assert ("Tensor", torch.bfloat16) in kinds("bf16", "stored") and ("Tensor", torch.bfloat16) in kinds("bf16", "as on a GPU")
    assert ("Tensor", torch.float16) in kinds("fp16", "stored") and ("Tensor", torch.float16) in kinds("fp16", "as on a GPU")


@pytest.mark.parametrize("source, target", [(("fp8_scaled", "default"), ("fp16", "fp8_e4m3fn_fast")),
                                            (("fp32", "fp8_e4m3fn"), ("fp8_scaled", "fp8_e4m3fn")),
                                            (("bf16", "stored"), ("fp8_e4m3fn", "default"))])
def test_a_lora_trained_on_one_precision_changes_another_through_the_stock_loader(wan, tmp_path, source, target,
                                                                                   caplog):
    import logging

    import folder_paths

    import nodes as comfy_nodes

    _, world, pack = wan
    from custvid_pack.nodes.training_nodes import SaveLoRA

    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    lora = _train(_load(*source), _subject(world, pack), settings=TRANSFERRED)[0].tensors
    name = SaveLoRA.execute(lora, "precision_test", "sks", True).result[0]

    def change(case):
        base = _load(*case)
        with caplog.at_level(logging.WARNING):
            with torch.inference_mode():
                (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, 1.0)
        return _denoise(patched) - _denoise(base)

    on_target, on_fp32 = change(target), change(("fp32", "default"))
    assert "lora key not loaded" not in caplog.text
    assert float(on_target.abs().max()) > 0.01
    # The same change as on the fp32 model, up to the target's rounding (seen: cosine 0.97 or more).
    assert torch.nn.functional.cosine_similarity(on_target.flatten(), on_fp32.flatten(), dim=0) > 0.9


FP8_BASES = [("fp8_e4m3fn", "fp8_e4m3fn"), ("fp8_scaled", "default"), ("fp16", "fp8_e4m3fn_fast")]


def _random_lora(patcher, roles=("self_attn.q", "ffn.0"), rank=2):
    g = torch.Generator().manual_seed(3)
    out = {}
    for b, block in enumerate(patcher.model.diffusion_model.blocks):
        for role in roles:
            layer = block.get_submodule(role)
            key = f"diffusion_model.blocks.{b}.{role}"
            out[key + ".lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
            out[key + ".lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
            out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def _apply(patcher, sigma, sigmas, x, context, rows=(0,)):
    import comfy.model_management

    options = {"wrappers": patcher.wrappers, **patcher.model_options.get("transformer_options", {}),
               "cond_or_uncond": list(rows), "sigmas": sigma, "sample_sigmas": sigmas}
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options).float()


def test_a_step_schedule_on_fp8_weights_adds_the_whole_lora_in_the_compute_dtype(wan):
    """The scheduled LoRA's weight function gets the weight already cast to the compute dtype (fp32 here), so
    its delta is not rounded into fp8: on fp8 storage it equals the stock LoRA merged into the same values in fp32."""
    import comfy.sd
    from custvid_pack.nodes.schedule_nodes import ApplyLoRASchedule

    fp8, same_values_fp32 = _load("fp8_e4m3fn", "fp8_e4m3fn"), _load("fp8_e4m3fn", "default")
    lora = _random_lora(fp8)
    scheduled = ApplyLoRASchedule.execute(fp8, "(use lora input)", "custom", "0:0.0, 0.5:1.0", lora=lora).result[0]
    arrived = []
    scheduled.add_weight_wrapper("diffusion_model.blocks.0.self_attn.q.weight", lambda w: arrived.append(w.dtype) or w)

    stock = comfy.sd.load_lora_for_models(same_values_fp32, None, lora, 1.0, 0)[0]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 2, 16, 16, generator=g), torch.randn(1, 16, 4096, generator=g)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    early, late = torch.tensor([0.75]), torch.tensor([0.5])
    assert torch.allclose(_apply(scheduled, early, sigmas, x, context), _apply(fp8, early, sigmas, x, context), atol=1e-5)
    assert torch.allclose(_apply(scheduled, late, sigmas, x, context), _apply(stock, late, sigmas, x, context), atol=1e-4)
    assert not torch.allclose(_apply(fp8, late, sigmas, x, context), _apply(stock, late, sigmas, x, context), atol=1e-3)
    assert arrived and set(arrived) == {torch.float32}


@pytest.mark.parametrize("base", FP8_BASES, ids=[f"{p}-{w}" for p, w in FP8_BASES])
def test_schedule_box_steering_and_camera_change_the_output_of_fp8_bases(wan, base):
    import comfy.sample
    import comfy.samplers

    _, world, pack = wan
    from custvid_pack.nodes.control_nodes import BoxSteeringNode, CameraSampleV2
    from custvid_pack.nodes.schedule_nodes import ApplyLoRASchedule
    from custvid_pack.nodes.world_nodes import world_clip

    patcher = _load(*base)
    prompt = "red striped circle moving right"
    with torch.no_grad():
        context = world.text([prompt, prompt])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 1, 32, 32, generator=g)
    sigmas, sigma = torch.linspace(1, 0, 11), torch.tensor([0.8, 0.8])
    plain = _apply(patcher, sigma, sigmas, x, context, rows=(0, 1))

    scheduled = ApplyLoRASchedule.execute(patcher, "(use lora input)", "smrabooth_subject", "",
                                          lora=_random_lora(patcher)).result[0]
    with_lora = _apply(scheduled, sigma, sigmas, x, context, rows=(0, 1))
    assert torch.isfinite(with_lora).all() and not torch.allclose(with_lora, plain, atol=1e-3)

    steered = BoxSteeringNode.execute(patcher, BoxTrack.parse("0: 0, 0, 0.5, 0.5"), prompt, "circle", 10.0, 0.5, "all",
                                      "", clip=world_clip(world.text)).result[0]
    out = _apply(steered, sigma, sigmas, x, context, rows=(0, 1))
    assert torch.isfinite(out).all() and not torch.allclose(out[0], plain[0], atol=1e-3)
    assert torch.allclose(out[1], plain[1], atol=1e-5)  # the unconditional pass is not steered

    positive, negative = [[context[:1], {}]], [[world.text([""]), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 16, 16)}
    with torch.inference_mode():
        moved = CameraSampleV2.execute(patcher, positive, negative, latent, 1, 4, 3.0, "euler", "simple", 0.3, 0.0, 1.0,
                                       "", 0.25, 0.75, 0).result[0]["samples"]
        still = comfy.sample.sample_custom(
            patcher, comfy.sample.prepare_noise(latent["samples"], 1), 3.0, comfy.samplers.sampler_object("euler"),
            comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 4).cpu(), positive,
            negative, latent["samples"], disable_pbar=True, seed=1)
    assert torch.isfinite(moved).all() and not torch.allclose(moved, still, atol=1e-3)


def test_through_the_server_a_scaled_fp8_file_loaded_as_fp8_trains_and_saves_an_fp32_lora(comfy_server, wan):
    import shutil

    from custvid_core.world.model import TEXT_FILE

    folder, _, _ = wan
    target = comfy_server.base / "models" / "diffusion_models"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "tiny_wan_fp8_scaled.safetensors", target / "tiny_wan_fp8_scaled.safetensors")
    info = comfy_server.object_info()
    for node in ("CustVid_TrainSubjectLoRA", "CustVid_TrainMotionLoRA"):  # optional, for saved graphs: only later
        optional = list(info[node]["input"]["optional"])  # additions come after it
        after = optional.index("training_dtype") + 1  # the memory inputs next; later additions after them
        assert optional[after:after + 3] == ["recompute_every", "offload_activations", "blocks_to_swap"]
        assert info[node]["input"]["optional"]["training_dtype"][1]["options"] == ["auto", "fp32", "bf16", "fp16"]
    case = info["CustVid_WorldCaseData"]["input"]["required"]["case"][1]["options"][0]
    train = dict(model=["unet", 0], subject=["subject", 0], steps=2, learning_rate=1e-3, rank=4,
                 roles="self_attn.q, self_attn.k, ffn.0", batch_size=1, alignment_weight=0.0, alignment_block=1,
                 timestep_sampling="uniform", shift=1.0, gradient_checkpointing=True, training_seed=0,
                 checkpoint_every=100, run_name="precision_server", preservation_weight=1.0, region_loss=True,
                 training_dtype="auto")
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_fp8_scaled.safetensors",
                                                        "weight_dtype": "fp8_e4m3fn"}},
        "world": {"class_type": "CustVid_LoadShapesWorld", "inputs": {"text_encoder_name": TEXT_FILE.name}},
        "data": {"class_type": "CustVid_WorldCaseData", "inputs": {"case": case, "motion_clip": 0}},
        "words": {"class_type": "CustVid_WorldTextEncode", "inputs": {"world_text": ["world", 0], "prompt": "sks"}},
        "subject": {"class_type": "CustVid_SubjectDataset", "inputs": {"vae": ["world", 1], "images": ["data", 0],
                                                                      "conditioning": ["words", 0],
                                                                      "masks": ["data", 1]}},
        "train": {"class_type": "CustVid_TrainSubjectLoRA", "inputs": train},
        "save": {"class_type": "CustVid_SaveLoRA", "inputs": {"lora": ["train", 1], "filename": "precision/server_fp8",
                                                             "trigger_words": "sks", "overwrite": True}},
    }
    result = comfy_server.run(prompt)
    assert result["ok"], result["error"]
    saved = load_file(comfy_server.base / "models" / "loras" / "precision" / "server_fp8.safetensors")
    assert saved and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if k.endswith("lora_up.weight"))
    prompt["train"]["inputs"]["training_dtype"] = "fp8"
    refused = comfy_server.run(prompt)
    assert not refused["ok"] and "training_dtype" in json.dumps(refused["node_errors"])


def test_train_motion_lora_node_trains_a_scaled_fp8_model_in_fp16_and_leaves_it_usable(wan, tmp_path):
    """The node as a graph runs it (inference mode): the MODEL it returns carries the LoRA, the user's MODEL
    keeps its quantized weights and its output, and loads a stock LoRA afterwards."""
    import comfy.sd
    import folder_paths
    from custvid_pack.nodes import training_nodes, world_nodes

    from custvid_core.world.scene import Scene, WorldSpec, render

    _, world, _ = wan
    folder_paths.set_output_directory(str(tmp_path))
    patcher = _load("fp8_scaled", "fp8_e4m3fn")
    before, plain = _storage(patcher.model.diffusion_model), _denoise(patcher)
    clip = render(Scene(), WorldSpec())
    with torch.no_grad():
        conditioning = [[world.text([clip.prompt]), {}]]
    with torch.inference_mode():
        clips = training_nodes.VideoDataset.execute(world_nodes.WorldVAE(), clip.frames, conditioning).result[0]
        model, lora, _ = training_nodes.TrainMotionLoRA.execute(
            patcher, clips, steps=3, learning_rate=1e-2, rank=4, roles="self_attn.v, self_attn.o, ffn.2", batch_size=1,
            alignment_weight=0.0, alignment_block=1, timestep_sampling="uniform", shift=1.0,
            gradient_checkpointing=True, training_seed=0, checkpoint_every=100, run_name="precision_motion",
            spatial_rank=4, debiased_weight=1.0, training_dtype="fp16").result[:3]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert _storage(patcher.model.diffusion_model) == before
    assert torch.equal(_denoise(patcher), plain)
    assert not torch.allclose(_denoise(model), plain, atol=1e-4)
    with torch.inference_mode():
        stock = comfy.sd.load_lora_for_models(patcher, None, _random_lora(patcher), 1.0, 0)[0]
    assert not torch.allclose(_denoise(stock), plain, atol=1e-3)
