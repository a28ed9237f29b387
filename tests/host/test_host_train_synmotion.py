"""Train SynMotion on the shapes world's model loaded by ComfyUI's own loader (in-process): a few steps with the
model's own prior clips give a MODEL whose motion LoRA changes what ComfyUI's sampler makes, the LoRA, and embeddings
that Apply SynMotion Embeddings puts on a new subject's prompt; the input MODEL is unchanged; bad input is refused."""

import pytest
import torch
from comfy_host import import_comfy, import_pack
from world_data import encode

from custvid_core.world.model import MODEL_FILE, load_world
from custvid_core.world.scene import Scene, WorldSpec, render

CAPTION = "red circle moving right"
NEW_SUBJECT = "blue square moving right"
TRAIN = dict(subject_words="red circle", motion_words="moving right", steps=6, learning_rate=1e-2, rank=4,
             refiner=True, timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False, training_seed=0,
             checkpoint_every=100)
PRIOR = dict(count=2, seed=0, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple")


def _state(patcher):
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


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


def _sample(model, world, prompt):
    import nodes as comfy_nodes

    positive, negative = encode(world["clip"], prompt), encode(world["clip"], "")
    return comfy_nodes.KSampler().sample(model, 0, 3, 3.0, "euler", "simple", positive, negative,
                                         world["latent"])[0]["samples"]


def test_trained_lora_changes_the_output_and_the_embeddings_apply_to_a_new_subject(world, monkeypatch):
    nodes, patcher, clip = world["nodes"], world["patcher"], world["clip"]
    before, base = _state(patcher), _sample(patcher, world, NEW_SUBJECT)
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

    with_lora = _sample(model, world, NEW_SUBJECT)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.allclose(_sample(patcher, world, NEW_SUBJECT), base)
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
