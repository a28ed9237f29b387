"""Train SynMotion on the shapes world's model loaded by ComfyUI's own loader (in-process): a few steps with the
model's own prior clips give a MODEL whose motion LoRA changes what ComfyUI's sampler makes, the LoRA, and embeddings
that Apply SynMotion Embeddings puts on a new subject's prompt; the input MODEL is unchanged; bad input is refused."""

import pytest
import torch
from comfy_host import import_comfy, import_pack
from world_data import encode, sample, weights

from custvid_core.world.model import MODEL_FILE, load_world
from custvid_core.world.scene import Scene, WorldSpec, render

CAPTION = "red circle moving right"
NEW_SUBJECT = "blue square moving right"
TRAIN = dict(subject_words="red circle", motion_words="moving right", steps=6, learning_rate=1e-2, rank=4,
             refiner=True, timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False, training_seed=0,
             checkpoint_every=100)
PRIOR = dict(count=2, seed=0, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import_comfy()
    import comfy.sd
    import folder_paths

    pack = import_pack()
    from custvid_pack.nodes import synmotion_nodes, training_nodes, world_nodes

    base = tmp_path_factory.mktemp("train_synmotion")
    folder_paths.set_output_directory(str(base / "output"))
    patcher = comfy.sd.load_diffusion_model(str(MODEL_FILE))
    clip, vae = world_nodes.world_clip(load_world().text), world_nodes.WorldVAE()
    clips = None
    for start in ((8, 12), (8, 20)):
        scene = render(Scene(colour="red", shape="circle", direction="right", start=start), WorldSpec())
        assert scene.prompt == CAPTION
        clips = training_nodes.VideoDataset.execute(vae, scene.frames, encode(clip, CAPTION), add_to=clips).result[0]
    latent = world_nodes.WorldEmptyLatent.execute(5, 32, 1).result[0]
    prior = synmotion_nodes.SubjectPriorClips.execute(patcher, clip, "blue striped square | moving up\n"
                                                      "green triangle | moving left", latent, **PRIOR).result[0]
    return dict(core=pack.custvid_core, nodes=synmotion_nodes, patcher=patcher, clip=clip, clips=clips, prior=prior,
                latent=latent, base=base)


def test_trained_lora_changes_the_output_and_the_embeddings_apply_to_a_new_subject(world, monkeypatch):
    nodes, patcher, clip = world["nodes"], world["patcher"], world["clip"]
    before, base = weights(patcher), sample(patcher, world["clip"], world["latent"], NEW_SUBJECT)
    runs, train = [], nodes.train_synmotion
    monkeypatch.setattr(nodes, "train_synmotion", lambda *a, **kw: runs.append(train(*a, **kw)) or runs[-1])
    model, lora, graph, learned = nodes.TrainSynMotion.execute(patcher, world["clips"], clip, CAPTION,
                                                               prior_clips=world["prior"], run_name="syn",
                                                               **TRAIN).result
    assert all(torch.equal(v, before[k]) for k, v in patcher.model.diffusion_model.state_dict().items())
    assert not patcher.patches  # the input MODEL has no LoRA; the output MODEL does
    assert graph.shape[0] == 1 and graph.shape[-1] == 3
    assert {k for record in runs[0].history for k in record} >= {"motion", "prior"}  # the prior clips were learned
    assert (world["base"] / "output" / "custvid_training" / "syn" / "checkpoint.pt").exists()

    with_lora = sample(model, world["clip"], world["latent"], NEW_SUBJECT)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.allclose(sample(patcher, world["clip"], world["latent"], NEW_SUBJECT), base)
    assert isinstance(lora, world["core"].adapters.lora.LoraWeights) and lora.trigger_words == "moving right"
    assert {k.split(".")[-2] for k in lora if k.endswith(".weight")} == {"lora_down", "lora_up"}  # native LoRA keys

    # The motion embedding has a row per motion token; Apply edits the new subject's prompt at its motion words.
    assert isinstance(learned, world["core"].adapters.synmotion.LearnedSynMotion)
    assert (learned.subject_words, learned.motion_words, learned.motion_residual.shape[0]) == ("red circle",
                                                                                                "moving right", 2)
    assert learned.refiner is not None
    conditioning = encode(clip, NEW_SUBJECT)
    applied = nodes.ApplySynMotionEmbeddings.execute(conditioning, learned, clip, NEW_SUBJECT).result[0]
    changed = (applied[0][0] - conditioning[0][0]).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [2, 3]


def test_bad_input_is_refused_with_the_input_named(world):
    nodes, patcher, clip = world["nodes"], world["patcher"], world["clip"]
    train = nodes.TrainSynMotion.execute
    with pytest.raises(ValueError, match="motion_words: 'left' is not in the prompt"):
        train(patcher, world["clips"], clip, CAPTION, run_name="bad", **{**TRAIN, "motion_words": "moving left"})
    # Prior clips the trained MODEL (with its motion LoRA) generated are another model's prior.
    trained = train(patcher, world["clips"], clip, CAPTION, run_name="no_prior", **{**TRAIN, "steps": 1}).result[0]
    other = nodes.SubjectPriorClips.execute(trained, clip, "blue striped square | moving up", world["latent"],
                                            **{**PRIOR, "count": 1}).result[0]
    with pytest.raises(ValueError, match="prior_clips: these clips were generated by another base model"):
        train(patcher, world["clips"], clip, CAPTION, prior_clips=other, run_name="other", **TRAIN)


def test_clips_captioned_differently_train_at_each_captions_own_rows(world, monkeypatch):
    """Clips of different subjects (the world's example clips) have captions whose words sit at other rows: each clip
    is matched to its own line of the prompt, and a caption that is none of the clips' is refused."""
    from custvid_pack.nodes import training_nodes, world_nodes

    nodes, clip = world["nodes"], world["clip"]
    captions = ["green square moving right", "blue striped triangle moving right"]
    clips = None
    for caption, (colour, texture, shape) in zip(captions, [("green", "plain", "square"), ("blue", "striped", "triangle")]):
        scene = render(Scene(colour=colour, texture=texture, shape=shape, direction="right"), WorldSpec())
        assert scene.prompt == caption
        clips = training_nodes.VideoDataset.execute(world_nodes.WorldVAE(), scene.frames, encode(clip, caption),
                                                    add_to=clips).result[0]
    seen = []
    train = nodes.train_synmotion
    monkeypatch.setattr(nodes, "train_synmotion", lambda backbone, data, positions, *a, **kw:
                        seen.append(positions) or train(backbone, data, positions, *a, **kw))
    settings = {**TRAIN, "steps": 1, "subject_words": "blue striped triangle, green square"}
    learned = nodes.TrainSynMotion.execute(world["patcher"], clips, clip, "\n".join(reversed(captions)),
                                           run_name="two_captions", **settings).result[3]
    assert [(p.subject, p.motion) for p in seen[0]] == [((0, 1), (2, 3)), ((0, 1, 2), (3, 4))]
    assert learned.subject_words == "blue striped triangle, green square"

    with pytest.raises(ValueError, match="prompt: clip 2's conditioning is not the encoding of its caption"):
        nodes.TrainSynMotion.execute(world["patcher"], clips, clip, captions[0], run_name="one_caption",
                                     **{**settings, "subject_words": "green square"})
    with pytest.raises(ValueError, match="subject_words: none of 'green square' is in the caption 'blue striped"):
        nodes.TrainSynMotion.execute(world["patcher"], clips, clip, "\n".join(captions), run_name="one_subject",
                                     **{**settings, "subject_words": "green square"})
    assert len(seen) == 1


def test_a_subject_trigger_embedding_and_a_stock_lora_combine_with_synmotion(world, tmp_path):
    """'My subject doing this motion': a subject's trigger embedding and SynMotion's embeddings edit one conditioning,
    each only its own words' rows, in either order alike; a stock LoRA loaded on the SynMotion MODEL acts beside its
    motion LoRA, as the two LoRA files loaded by the stock loader on the base model do."""
    import folder_paths
    from custvid_pack.nodes import embedding_nodes, training_nodes
    from safetensors.torch import save_file

    import nodes as comfy_nodes

    nodes, patcher, clip = world["nodes"], world["patcher"], world["clip"]
    model, lora, _, learned = nodes.TrainSynMotion.execute(patcher, world["clips"], clip, CAPTION, run_name="combined",
                                                           **{**TRAIN, "steps": 2}).result
    prompt = "sks moving right"  # the world's tokenizer: sks=0, moving=1, right=2
    trigger = world["core"].adapters.embedding.LearnedTrigger(
        torch.randn(1, 4096, generator=torch.Generator().manual_seed(5)), "sks")
    conditioning = encode(clip, prompt)
    before = conditioning[0][0].clone()

    def with_trigger(c):
        return embedding_nodes.ApplyTriggerEmbedding.execute(c, trigger, prompt, clip=clip).result[0]

    def with_synmotion(c):
        return nodes.ApplySynMotionEmbeddings.execute(c, learned, clip, prompt).result[0]

    def changed_rows(c):
        return ((c[0][0] - before).abs().sum(-1)[0] > 0).nonzero().flatten().tolist()

    subject_only, motion_only = with_trigger(conditioning), with_synmotion(conditioning)
    assert changed_rows(subject_only) == [0] and changed_rows(motion_only) == [1, 2]
    one_order, other_order = with_synmotion(subject_only), with_trigger(motion_only)
    assert changed_rows(one_order) == [0, 1, 2]
    assert torch.allclose(one_order[0][0], other_order[0][0], atol=1e-6)
    assert torch.equal(one_order[0][0][:, :1], subject_only[0][0][:, :1])
    assert torch.allclose(one_order[0][0][:, 1:], motion_only[0][0][:, 1:], atol=1e-6)
    assert torch.equal(conditioning[0][0], before)

    # A subject LoRA (random, on every block's ffn.0, in ComfyUI's keys) loaded by the stock loader.
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    g = torch.Generator().manual_seed(4)
    save_file({k: v for b in range(6) for k, v in (
        (f"diffusion_model.blocks.{b}.ffn.0.lora_down.weight", torch.randn(4, 128, generator=g) * 0.2),
        (f"diffusion_model.blocks.{b}.ffn.0.lora_up.weight", torch.randn(512, 4, generator=g) * 0.2))},
              str(tmp_path / "subject.safetensors"))
    training_nodes.SaveLoRA.execute(lora, "motion", "moving right", False)

    def stock(m, name):
        return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, 1.0)[0]

    def sample_edited(m):
        positive, negative = one_order, encode(clip, "")
        return comfy_nodes.KSampler().sample(m, 0, 3, 3.0, "euler", "simple", positive, negative,
                                             world["latent"])[0]["samples"]

    both = sample_edited(stock(model, "subject.safetensors"))
    for alone in (sample_edited(patcher), sample_edited(model), sample_edited(stock(patcher, "subject.safetensors"))):
        assert not torch.allclose(both, alone, atol=1e-3)
    stock_files = sample_edited(stock(stock(patcher, "subject.safetensors"), "motion.safetensors"))
    assert torch.allclose(both, stock_files, atol=1e-4)


def test_the_world_synmotion_workflow_trains_saves_and_generates_a_new_subject(comfy_server):
    """The shipped world SynMotion workflow, shortened (4 prior clips of 2 steps, 6 training steps, 2 sampling
    steps), end to end through a real server: its links type-check, it trains on both kinds of step, saves the LoRA
    and the embeddings, and saves a video of its new subject's prompt."""
    from workflow_api import check_links, inputs_of, shipped, to_api

    from custvid_core.adapters.synmotion import load_synmotion

    workflow = shipped("13")
    info = comfy_server.object_info()
    assert not check_links(workflow, info)
    prompt = to_api(workflow, info)
    inputs_of(prompt, "CustVid_SubjectPriorClips").update(count=4, steps=2)
    inputs_of(prompt, "CustVid_TrainSynMotion").update(steps=6, run_name="world_synmotion_host_test")
    inputs_of(prompt, "KSampler")["steps"] = 2
    new_subject = inputs_of(prompt, "PrimitiveString")["value"]
    assert new_subject.endswith(" mtn") and not any(
        new_subject.startswith(c) for c in ("green square", "blue striped triangle", "yellow cross"))
    result = comfy_server.run(prompt, timeout=900)
    assert result["ok"], result["error"]
    models = comfy_server.base / "models"
    assert (models / "loras" / "custvid" / "world_synmotion.safetensors").exists()
    learned = load_synmotion(models / "custvid" / "synmotion" / "custvid" / "world_synmotion.safetensors")
    assert (learned.motion_words, learned.subject_words) == ("mtn", "green square, blue striped triangle, yellow cross")
    checkpoint = comfy_server.base / "output" / "custvid_training" / "world_synmotion_host_test" / "checkpoint.pt"
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert len(history) == 6 and {"motion", "prior"} <= {k for r in history for k in r}
    assert comfy_server.saved("custvid/world_synmotion")
    previews = [im for o in result["outputs"].values() for im in o.get("images", []) if im["type"] == "temp"]
    assert len(previews) == 1  # the loss graph


def test_the_memory_savings_learn_the_same_lora_and_embeddings(world, monkeypatch):
    """Checkpointing every other block with its activations offloaded and the last block swapped learn what the
    plain run learns (to float rounding): they move data, not what is computed."""
    nodes, patcher, clip = world["nodes"], world["patcher"], world["clip"]
    backbone_class, used = world["core"].backbones.wan.WanBackbone, []
    training_memory = backbone_class.training_memory
    monkeypatch.setattr(backbone_class, "training_memory",
                        lambda self, checkpointing, memory, device: used.append(memory) or training_memory(
                            self, checkpointing, memory, device))
    settings = {**TRAIN, "steps": 3, "gradient_checkpointing": True}
    _, plain, _, plain_learned = nodes.TrainSynMotion.execute(patcher, world["clips"], clip, CAPTION,
                                                              prior_clips=world["prior"], run_name="mem_plain",
                                                              **settings).result
    _, saved, _, saved_learned = nodes.TrainSynMotion.execute(patcher, world["clips"], clip, CAPTION,
                                                              prior_clips=world["prior"], run_name="mem_saving",
                                                              recompute_every=2, offload_activations=True,
                                                              blocks_to_swap=1, **settings).result
    assert [(m.recompute_every, m.offload_activations, m.blocks_to_swap) for m in used] == [(1, False, 0), (2, True, 1)]
    assert plain.keys() == saved.keys()
    assert all(torch.allclose(plain[k], saved[k], atol=1e-5) for k in plain)
    assert torch.allclose(plain_learned.motion_residual, saved_learned.motion_residual, atol=1e-5)
