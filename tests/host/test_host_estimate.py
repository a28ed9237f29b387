"""Estimate Training Memory in a real ComfyUI server: it reads the MODEL that ComfyUI's own loader gives (its blocks,
width and stored precision) and the dataset's latents, shows the estimator's table under the node, and refuses a
recipe without its dataset, naming the input."""

from custvid_core.backbones.estimate import estimate, latent_setup, size_of, table
from custvid_core.backbones.memory import MemorySettings
from custvid_core.world import latent as world_latent
from custvid_core.world.model import MODEL_FILE, TEXT_FILE, load_world
from custvid_core.world.scene import Scene, render


def _graph(weight_dtype="default", **estimate_inputs) -> dict:
    nodes = dict(
        unet=("UNETLoader", {"unet_name": MODEL_FILE.name, "weight_dtype": weight_dtype}),
        world=("CustVid_LoadShapesWorld", {"text_encoder_name": TEXT_FILE.name}),
        case=("CustVid_WorldCaseData", {"case": "orange_star_circle", "motion_clip": 0}),
        cond=("CustVid_WorldTextEncode", {"world_text": ["world", 0], "prompt": "a sks"}),
        clips=("CustVid_VideoDataset", {"vae": ["world", 1], "frames": ["case", 2], "conditioning": ["cond", 0]}),
        est=("CustVid_EstimateTrainingMemory", {"model": ["unet", 0], "recipe": "motion", "rank": 8, "batch_size": 2,
                                                "gradient_checkpointing": True, "encoders_loaded": False,
                                                "clips": ["clips", 0], **estimate_inputs}),
    )
    return {k: {"class_type": t, "inputs": i} for k, (t, i) in nodes.items()}


def test_estimate_reads_the_loaded_model_and_the_clips(comfy_server):
    result = comfy_server.run(_graph(blocks_to_swap=2, recompute_every=2))
    assert result["ok"], result["error"]
    shown = result["outputs"]["est"]["text"][0]
    # The same estimate from the world's own (diffusers) model and its clips' latents, in this process.
    world = load_world()
    latents = world_latent.encode(render(Scene(), world.spec).frames)
    expected = estimate(latent_setup(size_of(world.backbone), latents.shape, batch=2, recipe="motion", rank=8,
                                     precision="fp32", memory=MemorySettings(recompute_every=2, blocks_to_swap=2)))
    assert shown == table(expected)
    assert f"{world.backbone.num_blocks} blocks, {world.backbone.dim} wide" in shown and "blocks swapped: 2" in shown


def test_estimate_counts_fp8_weights_as_loaded(comfy_server):
    full = comfy_server.run(_graph())
    fp8 = comfy_server.run(_graph(weight_dtype="fp8_e4m3fn"))
    assert full["ok"] and fp8["ok"], (full["error"], fp8["error"])
    full_text, fp8_text = full["outputs"]["est"]["text"][0], fp8["outputs"]["est"]["text"][0]
    assert "fp32 weights" in full_text and "fp8 weights" in fp8_text

    def weights(text):
        return float(next(line for line in text.splitlines() if line.startswith("weights")).split()[1])

    assert weights(fp8_text) < weights(full_text)


def test_a_recipe_without_its_dataset_is_refused_by_name(comfy_server):
    result = comfy_server.run(_graph(recipe="subject"))
    assert not result["ok"] and "subject: is not connected" in result["error"]
    assert comfy_server.alive()


def test_a_dataset_in_size_buckets_is_estimated_from_its_largest_bucket(comfy_server):
    graph = _graph()
    plain = comfy_server.run(graph)
    graph["clips"]["inputs"].update(buckets=True, bucket_width=32, bucket_height=32)  # the clips' own size
    bucketed = comfy_server.run(graph)
    assert plain["ok"] and bucketed["ok"], (plain["error"], bucketed["error"])
    # One size of clips makes one bucket of the same latents: the same estimate as without buckets.
    assert bucketed["outputs"]["est"]["text"][0] == plain["outputs"]["est"]["text"][0]
