"""Previews while training, in ComfyUI: the train nodes' preview_every samples the shapes world's model (loaded by
ComfyUI's own loader) with the adapters as they are through ComfyUI's sampler, shows each preview as the node's
progress preview, writes it to the run's folder and lists the latest in the node's UI output; the loss graph marks
it; the loss curve is the one without previews; an interrupt during a preview stops the run with its checkpoint
kept."""

import json

import numpy as np
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
    """The two previews of a run differ (the LoRA learned in between); the saved frames are the VAE's decoding. The
    previews sample through the memory savings' hooks (checkpointing every other block, a block swapped)."""
    nodes = world["nodes"]
    motion = {k: v for k, v in TRAIN.items() if k not in ("preservation_weight", "region_loss")}
    motion.update(steps=2, checkpoint_every=1, gradient_checkpointing=True)
    nodes.TrainMotionLoRA.execute(world["patcher"], world["clips"], **motion, recompute_every=2, blocks_to_swap=1,
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
            frames.append(torch.tensor(np.array(clip.convert("RGB")), dtype=torch.float32))
    assert (frames[0] - frames[1]).abs().mean() > 0.5


def test_a_dataset_in_size_buckets_previews_at_its_first_buckets_size(world):
    from custvid_pack.custvid_core.training.datasets import Bucketed  # the pack's own classes, as its nodes see them

    nodes = world["nodes"]
    clips = Bucketed((world["clips"],), (None,))  # as the dataset nodes' buckets input makes one
    motion = {k: v for k, v in TRAIN.items() if k not in ("preservation_weight", "region_loss")}
    nodes.TrainMotionLoRA.execute(world["patcher"], clips, **{**motion, "steps": 2}, run_name="bucket_previews",
                                  spatial_rank=4, debiased_weight=1.0, preview_every=2, vae=world["vae"])
    with Image.open(_run_folder(world, "bucket_previews") / "previews" / "step_000002.webp") as clip:
        assert clip.size == (32, 32) and clip.n_frames == 5  # the bucket's: the world's clips' size and length


def test_train_dualreal_and_joint_loras_take_previews(world, monkeypatch):
    import comfy.clip_vision

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
    # With CLIP vision inputs the motion adapters see the subject's reference image, as in the node's MODEL.
    vision = []
    for rows, seed in ((2, 1), (2, 2)):  # one image per clip, one per photo: the reference is their mean
        vision.append(comfy.clip_vision.Output())
        vision[-1]["image_embeds"] = torch.randn(rows, 12, generator=torch.Generator().manual_seed(seed))
    seen, make = [], dualreal.previewer
    monkeypatch.setattr(dualreal, "previewer", lambda *a: (lambda step, parts: seen.append(
        parts["dualreal_motion"].condition.cpu()) or make(*a)(step, parts)))
    dualreal.TrainDualReal.execute(world["patcher"], world["subject"], world["clips"], steps=2, learning_rate=1e-2,
                                   groups=2, bottleneck=8, motion_probability=0.5, residual="code", weighting="code",
                                   timestep_sampling="uniform", shift=3.0, gradient_checkpointing=False,
                                   training_seed=0, checkpoint_every=100, run_name="dualreal_vision_previews",
                                   clips_image=vision[0], subject_image=vision[1], preview_every=1, vae=world["vae"])
    reference = vision[1]["image_embeds"].mean(dim=0, keepdim=True)
    assert len(seen) == 2 and all(torch.allclose(c, reference) for c in seen)
    for run in ("joint_previews", "dualreal_previews", "dualreal_vision_previews"):
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


def test_without_a_vae_previews_show_comfyuis_latent_preview_colours(world):
    world["nodes"].TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="no_vae", preview_every=2,
                                            **{**TRAIN, "steps": 2})
    with Image.open(_run_folder(world, "no_vae") / "previews" / "step_000002.webp") as clip:
        assert clip.size == tuple(world["subject"].latents.shape[-2:])[::-1] and clip.n_frames == 1


def test_a_preview_prompt_needs_a_text_encoder(world):
    with pytest.raises(ValueError, match="clip: is not connected while preview_prompt is set"):
        world["nodes"].TrainSubjectLoRA.execute(world["patcher"], world["subject"], run_name="no_clip",
                                                preview_every=2, preview_prompt="orange star", vae=world["vae"],
                                                **TRAIN)


def test_train_synmotion_previews_a_new_subject_doing_the_motion(world):
    from world_data import encode

    from custvid_core.world.scene import Scene, WorldSpec, render

    clips = None
    for start in ((8, 12), (8, 20)):
        scene = render(Scene(colour="red", shape="circle", direction="right", start=start), WorldSpec())
        clips = world["nodes"].VideoDataset.execute(world["vae"], scene.frames, encode(world["clip"], scene.prompt),
                                                    add_to=clips).result[0]
    args = dict(steps=2, learning_rate=1e-2, rank=4, refiner=True, timestep_sampling="uniform", shift=3.0,
                gradient_checkpointing=False, training_seed=0, checkpoint_every=100, preview_every=1, vae=world["vae"])
    world["synmotion"].TrainSynMotion.execute(world["patcher"], clips, world["clip"], "red circle moving right",
                                              "red circle", "moving right", run_name="synmotion_previews",
                                              preview_prompt="blue square moving right", **args)
    index = json.loads((_run_folder(world, "synmotion_previews") / "previews" / "index.json").read_text())
    assert [(e["step"], e["prompt"]) for e in index] == [(1, "blue square moving right"),
                                                         (2, "blue square moving right")]
    with pytest.raises(ValueError, match="preview_prompt: 'right' is not in the prompt 'blue square moving left'"):
        world["synmotion"].TrainSynMotion.execute(world["patcher"], clips, world["clip"], "red circle moving right",
                                                  "red circle", "moving right", run_name="synmotion_no_words",
                                                  preview_prompt="blue square moving left", **args)


def _listening(url: str, client_id: str, messages: list, stop):
    """A thread that keeps what ComfyUI's websocket sends this client (JSON messages as dicts, binary as bytes), as
    the frontend receives them."""
    import asyncio
    import threading

    import aiohttp

    async def listen():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
                while not stop.is_set():
                    try:
                        message = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.BINARY:
                        messages.append(bytes(message.data))
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(message.data))
                    else:
                        return

    thread = threading.Thread(target=lambda: asyncio.run(listen()), daemon=True)
    thread.start()
    return thread


def test_a_train_node_with_previews_in_the_real_server(comfy_server):
    """The shipped world workflow's Train Subject LoRA (what feeds it and its Save LoRA), 4 steps with preview_every 2 and the VAE
    connected, queued on a real server: the frontend's websocket gets each preview as the node's progress preview
    image, the node's UI output lists the latest preview, which the server serves, and the run's folder keeps both."""
    import struct
    import threading
    import time
    import uuid

    import requests
    from workflow_api import shipped, to_api

    prompt = to_api(shipped("01"), comfy_server.object_info())
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "CustVid_TrainSubjectLoRA")
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "CustVid_SaveLoRA"
                   and v["inputs"]["lora"][0] == train_id)
    needed, todo = set(), [save_id]
    while todo:  # Save LoRA (an output node) and what it takes
        node = todo.pop()
        needed.add(node)
        todo += [v[0] for v in prompt[node]["inputs"].values() if isinstance(v, list) and v[0] not in needed]
    prompt = {k: v for k, v in prompt.items() if k in needed}
    dataset = next(v for v in prompt.values() if v["class_type"] == "CustVid_SubjectDataset")
    prompt[train_id]["inputs"].update(steps=4, run_name="previews_host_test", preview_every=2,
                                      vae=dataset["inputs"]["vae"])
    client_id, messages, stop = uuid.uuid4().hex, [], threading.Event()
    listener = _listening(comfy_server.url, client_id, messages, stop)
    time.sleep(1)
    r = requests.post(comfy_server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=30)
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    deadline = time.time() + 900
    while prompt_id not in (history := comfy_server.get(f"/history/{prompt_id}")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    listener.join(5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]

    # Each preview arrives as a JPEG preview image right after the train node's progress at its step.
    images = [i for i, m in enumerate(messages) if isinstance(m, bytes) and struct.unpack(">I", m[:4])[0] == 1]
    progress = [m["data"] for m in messages if isinstance(m, dict) and m.get("type") == "progress"
                and m["data"]["node"] == train_id]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 4), (2, 4), (2, 4), (3, 4), (4, 4), (4, 4)]
    assert len(images) == 2
    for i in images:
        assert struct.unpack(">I", messages[i][4:8])[0] == 1  # JPEG
        assert messages[i][8:10] == b"\xff\xd8"
        assert messages[i - 1]["type"] == "progress" and messages[i - 1]["data"]["node"] == train_id

    shown = entry["outputs"][train_id]
    assert shown["images"] == [{"filename": "step_000004.webp", "subfolder": "custvid_training/previews_host_test/"
                                "previews", "type": "output"}] and shown["animated"] == [True]
    served = requests.get(comfy_server.url + "/view", params=shown["images"][0], timeout=30)
    assert served.status_code == 200 and served.content[8:12] == b"WEBP"
    folder = comfy_server.base / "output" / "custvid_training" / "previews_host_test" / "previews"
    assert [e["step"] for e in json.loads((folder / "index.json").read_text())] == [2, 4]
    assert (folder / "step_000004.webp").read_bytes() == served.content
