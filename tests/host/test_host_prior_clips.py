"""Subject Prior Clips on the shapes world's model loaded by ComfyUI's own loader (in-process): the clips are what
ComfyUI's stock KSampler makes of each prompt with the frozen MODEL, kept with their prompts' conditioning, cached
in output/custvid_cache and read back on a rerun; another model does not reuse them; bad prompts are refused."""

import pytest
import torch
from comfy_host import import_comfy, import_pack, tiny_world_wan
from world_data import encode

from custvid_core.world.model import MODEL_FILE, load_world

PROMPTS = "red circle | moving left\nblue striped square | moving up"
SETTINGS = dict(count=3, seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import_comfy()
    import comfy.sd
    import folder_paths

    pack = import_pack()
    from custvid_pack.nodes import synmotion_nodes, world_nodes

    base = tmp_path_factory.mktemp("prior")
    folder_paths.set_output_directory(str(base / "output"))
    return dict(nodes=synmotion_nodes, core=pack.custvid_core, patcher=comfy.sd.load_diffusion_model(str(MODEL_FILE)), base=base,
                clip=world_nodes.world_clip(load_world().text), latent=world_nodes.WorldEmptyLatent.execute(5, 32, 2).result[0])


def _prior(world, model=None, prompts=PROMPTS, **kw):
    return world["nodes"].SubjectPriorClips.execute(model or world["patcher"], world["clip"], prompts, world["latent"],
                                                    **{**SETTINGS, **kw}).result[0]


def test_prior_clips_are_the_stock_ksamplers_clips_of_the_frozen_model_cached_and_reused(world, monkeypatch):
    import comfy.sample

    import nodes as comfy_nodes

    weights = {k: v.clone() for k, v in world["patcher"].model.diffusion_model.state_dict().items()}
    clips = _prior(world)
    assert isinstance(clips, world["core"].training.datasets.VideoSet) and clips.latents.shape == (3, 16, 1, 32, 32)
    assert [p.text for p in clips.prompts] == ["red circle moving left", "blue striped square moving up",
                                               "red circle moving left"]
    negative = encode(world["clip"], "")
    one = {"samples": world["latent"]["samples"][:1]}
    for k, prompt in enumerate(clips.prompts):
        positive = encode(world["clip"], prompt.text)
        assert torch.equal(clips.context[k], positive[0][0][0].float())
        stock = comfy_nodes.KSampler().sample(world["patcher"], 5 + k, 2, 4.0, "euler", "simple", positive, negative,
                                              one)[0]["samples"]
        assert torch.allclose(clips.latents[k], stock[0].float(), atol=1e-5)
    assert clips.latents[0].std() > 0 and not torch.allclose(clips.latents[0], clips.latents[2])  # seeds 5 and 7
    assert all(torch.equal(v, weights[k]) for k, v in world["patcher"].model.diffusion_model.state_dict().items())
    cached = list((world["base"] / "output" / "custvid_cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors"

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached clip was generated again")

    monkeypatch.setattr(comfy.sample, "sample", no_sampling)
    assert torch.equal(_prior(world).latents, clips.latents)
    with pytest.raises(AssertionError, match="generated again"):  # another seed is not the cache's
        _prior(world, seed=6)


def test_another_model_generates_its_own_clips_and_bad_prompts_are_refused(world, tmp_path):
    patcher, _, _ = tiny_world_wan(tmp_path)
    before = len(list((world["base"] / "output" / "custvid_cache").glob("*.safetensors")))
    other = _prior(world, patcher, count=1)
    first = _prior(world, count=1)
    assert other.base_model != first.base_model
    assert not torch.allclose(other.latents, first.latents)
    with pytest.raises(world["core"].errors.InputError) as refused:
        first.require_model(other.base_model)
    assert refused.value.input_name == "prior_clips"
    assert len(list((world["base"] / "output" / "custvid_cache").glob("*.safetensors"))) == before + 2
    for prompts in ("", "red circle moving left", "red circle |"):
        with pytest.raises(world["core"].errors.InputError) as refused:
            _prior(world, prompts=prompts)
        assert refused.value.input_name == "prompts"


def test_an_emptied_cache_is_refused_naming_the_file_to_delete_and_left_as_it_is(world):
    from custvid_core.files import save_safetensors

    settings = {**SETTINGS, "seed": 11, "count": 1}
    cache = world["base"] / "output" / "custvid_cache"
    before = set(cache.glob("*.safetensors"))
    _prior(world, **settings)
    (path,) = set(cache.glob("*.safetensors")) - before
    tensors, meta = world["core"].files.load_safetensors(path)
    save_safetensors(path, {k: v[:0] for k, v in tensors.items()}, meta)  # the same cache, holding no clips
    emptied = path.read_bytes()
    with pytest.raises(world["core"].errors.InputError) as refused:
        _prior(world, **settings)
    message = str(refused.value)
    assert refused.value.input_name == "cache" and str(path) in message and "holds no clips" in message
    assert "delete that file and the clips are generated again" in message
    assert path.read_bytes() == emptied
    path.unlink()
    assert _prior(world, **settings).latents.shape[0] == 1


def test_the_clips_record_the_model_itself_after_a_lora_patched_clone_of_it_ran(world):
    """ComfyUI unpatches a model lazily: after a prompt that sampled with a LoRA on a clone of the MODEL, its
    weights hold the LoRA until the next load. The prior clips must record the MODEL as Train SynMotion sees it
    (loaded), or training refuses them as another model's."""
    import comfy.model_management

    patched = world["patcher"].clone()
    key = next(k for k in patched.model_state_dict() if k.endswith("blocks.0.self_attn.q.weight"))
    patched.add_patches({key: (torch.ones_like(patched.model_state_dict()[key]),)}, 0.5)  # a diff patch, as a LoRA
    comfy.model_management.load_models_gpu([patched])  # the clone's weights, patched in place
    clips = _prior(world, count=1, seed=11)
    comfy.model_management.load_models_gpu([world["patcher"]])
    assert clips.base_model == world["nodes"].base_model_signature(world["patcher"])
