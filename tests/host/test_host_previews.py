"""Previews while training, in ComfyUI: the train nodes' preview_every samples the shapes world's model (loaded by
ComfyUI's own loader) with the adapters as they are through ComfyUI's sampler, shows each preview as the node's
progress preview, writes it to the run's folder and lists the latest in the node's UI output; the loss graph marks
it; the loss curve is the one without previews; an interrupt during a preview stops the run with its checkpoint
kept."""

import json

import pytest
import torch
from comfy_host import import_comfy, import_pack
from PIL import Image
from world_data import world_training_inputs

TRAIN = dict(steps=4, learning_rate=1e-2, rank=4, roles="self_attn.q, self_attn.k, ffn.0", batch_size=1,
             alignment_weight=0.0, alignment_block=1, timestep_sampling="uniform", shift=3.0,
             gradient_checkpointing=False, training_seed=0, checkpoint_every=2, preservation_weight=1.0,
             region_loss=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import_comfy()
    import_pack()
    from custvid_pack.nodes import dualreal_nodes, synmotion_nodes, training_nodes, world_nodes

    base = tmp_path_factory.mktemp("previews")
    patcher, clip, subject, clips = world_training_inputs(base, training_nodes, world_nodes)
    return dict(nodes=training_nodes, dualreal=dualreal_nodes, synmotion=synmotion_nodes, patcher=patcher, clip=clip,
                subject=subject, clips=clips, vae=world_nodes.WorldVAE(), base=base)


@pytest.fixture
def progress_previews():
    """The progress bar updates ComfyUI's hook receives while a node runs: (value, total, preview)."""
    import comfy.utils

    seen, hook = [], comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append(
        (value, total, preview)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(hook)


def _run_folder(world, name):
    return world["base"] / "output" / "custvid_training" / name


def test_train_subject_lora_previews_show_on_the_node_and_are_kept_and_marked(world, progress_previews):
    nodes = world["nodes"]
    out = nodes.TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="subject_previews",
                                         preview_every=2, vae=world["vae"], **TRAIN)
    plain = nodes.TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="subject_plain", **TRAIN)
    shown = [(value, total, preview) for value, total, preview in progress_previews if preview is not None]
    assert [(value, total) for value, total, _ in shown] == [(2, 4), (4, 4)]
    assert all(p[0] == "JPEG" and isinstance(p[1], Image.Image) for _, _, p in shown)

    folder = _run_folder(world, "subject_previews") / "previews"
    index = json.loads((folder / "index.json").read_text())
    assert [(e["step"], e["file"], e["seed"]) for e in index] == [(2, "previews/step_000002.webp", 0),
                                                                 (4, "previews/step_000004.webp", 0)]
    with Image.open(folder / "step_000004.webp") as clip:
        assert clip.format == "WEBP" and clip.size == (32, 32)  # the world's photos' size
    assert out.ui["images"] == [{"filename": "step_000004.webp", "subfolder": "custvid_training/subject_previews/"
                                 "previews", "type": "output"}]
    # The loss curve and the LoRA are those of the run without previews; its graph has the marks.
    assert [r["loss"] for r in torch.load(_run_folder(world, "subject_previews") / "checkpoint.pt",
                                          weights_only=True)["history"]] == \
        [r["loss"] for r in torch.load(_run_folder(world, "subject_plain") / "checkpoint.pt",
                                       weights_only=True)["history"]]
    lora, plain_lora = out.result[1], plain.result[1]
    assert all(torch.equal(lora[k], plain_lora[k]) for k in plain_lora)
    assert not torch.equal(out.result[2], plain.result[2])


def test_a_preview_samples_with_the_adapters_as_they_are(world):
    """The two previews of a run differ (the LoRA learned in between); the saved frames are the VAE's decoding."""
    nodes = world["nodes"]
    nodes.TrainMotionLoRA.execute(world["patcher"], world["clips"], **{**TRAIN, "steps": 2, "checkpoint_every": 1},
                                  run_name="motion_previews", spatial_rank=4, debiased_weight=1.0,
                                  preview_every=1, vae=world["vae"], preview_prompt="red circle moving right",
                                  clip=world["clip"])
    folder = _run_folder(world, "motion_previews") / "previews"
    index = json.loads((folder / "index.json").read_text())
    assert [(e["step"], e["prompt"]) for e in index] == [(1, "red circle moving right"), (2, "red circle moving right")]
    frames = []
    for entry in index:
        with Image.open(folder / entry["file"].split("/")[-1]) as clip:
            assert clip.n_frames == 5  # the clips' length, the world's 5 frames
            frames.append(torch.tensor(list(clip.convert("RGB").getdata()), dtype=torch.float32))
    assert (frames[0] - frames[1]).abs().mean() > 0.5


def test_train_dualreal_joint_and_synmotion_take_previews(world):
    nodes, dualreal = world["nodes"], world["dualreal"]
    joint = dict(steps=2, learning_rate=1e-2, motion_probability=0.5, controller=True, groups=2, subject_rank=4,
                 motion_rank=4, spatial_rank=4, stillness_rank=0, batch_size=1, subject_alignment_weight=0.0,
                 motion_alignment_weight=0.0, alignment_block=1, preservation_weight=1.0, region_loss=True,
                 region_margin=0, moving_share=0.5, debiased_weight=1.0, timestep_sampling="uniform", shift=3.0,
                 gradient_checkpointing=False, training_seed=0, checkpoint_every=100)
    nodes.TrainJointLoRAs.execute(world["patcher"], world["subject"], world["clips"], run_name="joint_previews",
                                  preview_every=2, vae=world["vae"], **joint)
    dualreal.TrainDualReal.execute(world["patcher"], world["subject"], world["clips"], steps=2, learning_rate=1e-2,
                                   groups=2, bottleneck=8, motion_probability=0.5, residual="code", weighting="code",
                                   timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False,
                                   training_seed=0, checkpoint_every=100, run_name="dualreal_previews",
                                   preview_every=2, vae=world["vae"])
    for run in ("joint_previews", "dualreal_previews"):
        assert (_run_folder(world, run) / "previews" / "step_000002.webp").exists(), run


def test_an_interrupt_during_a_preview_stops_the_run_and_keeps_its_checkpoint(world, monkeypatch):
    import comfy.model_management

    from custvid_pack.nodes import preview

    sample = preview.comfy.sample.sample

    def interrupted(*args, **kwargs):
        comfy.model_management.interrupt_current_processing(True)
        return sample(*args, **kwargs)

    monkeypatch.setattr(preview.comfy.sample, "sample", interrupted)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            world["nodes"].TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="interrupted",
                                                    preview_every=2, vae=world["vae"], **TRAIN)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    history = torch.load(_run_folder(world, "interrupted") / "checkpoint.pt", weights_only=True)["history"]
    assert len(history) == 2
    assert not (_run_folder(world, "interrupted") / "previews" / "step_000002.webp").exists()


def test_a_preview_prompt_needs_a_text_encoder(world):
    with pytest.raises(ValueError, match="clip: is not connected while preview_prompt is set"):
        world["nodes"].TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="no_clip",
                                                preview_every=2, preview_prompt="orange star", vae=world["vae"],
                                                **TRAIN)
