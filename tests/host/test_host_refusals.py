"""Bad inputs through a real ComfyUI server: each is refused by the node it reaches with a CustVid error naming
the input (never a raw exception, never ComfyUI's own traceback of ours), nothing is written, and the server
lives on. Also: a reused run name resumes only its own run and says so under the node."""

import json
import time
import uuid

import pytest
import requests
import torch
from comfy_host import MOTION_CLIP, SUBJECT_PHOTO, import_pack, tiny_world
from safetensors.torch import save_file

from custvid_core.adapters.embedding import LearnedTrigger, save_trigger_embedding
from custvid_core.adapters.synmotion import LearnedSynMotion, save_synmotion
from custvid_core.world.model import MODEL_FILE, TEXT_FILE, save_world


def run(server, prompt: dict, timeout: float = 300) -> dict:
    """Queue an API prompt; returns ok, the execution error (type, message, node type) or the validation
    errors, and the outputs (with each node's UI)."""
    r = requests.post(server.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=30)
    if r.status_code != 200:
        return {"ok": False, "validation": r.json(), "error": None, "outputs": {}}
    return finished(server, r.json()["prompt_id"], timeout)


def finished(server, prompt_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry:
            errors = [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]
            return {"ok": entry["status"].get("status_str") == "success", "validation": None,
                    "error": errors[0] if errors else None, "outputs": entry.get("outputs", {})}
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish; log: {server.log}")


def run_watching(server, prompt: dict, timeout: float = 300) -> tuple[dict, list[tuple[str, str]]]:
    """`run`, listening on the websocket as the frontend does; also returns the text previews the nodes sent
    (node id, text), which the frontend shows under the node."""
    import asyncio
    import struct

    import aiohttp

    client_id = uuid.uuid4().hex

    async def listen():
        texts = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
                queued = await session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id})
                prompt_id = (await queued.json())["prompt_id"]
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", message.data[:4])[0] == 3:
                        length = struct.unpack(">I", message.data[4:8])[0]
                        texts.append((message.data[8:8 + length].decode(), message.data[8 + length:].decode()))
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(message.data)
                        if event["type"] in ("execution_success", "execution_error") and \
                                event["data"].get("prompt_id") == prompt_id:
                            return prompt_id, texts
        raise RuntimeError("the websocket closed before the prompt finished")

    prompt_id, texts = asyncio.run(asyncio.wait_for(listen(), timeout))
    return finished(server, prompt_id, timeout), texts


def graph(**nodes) -> dict:
    return {k: {"class_type": t, "inputs": i} for k, (t, i) in nodes.items()}


def show(source: str, index: int = 0) -> tuple:
    """An output node that runs `source`."""
    return "PreviewAny", {"source": [source, index]}


# --- the pieces the cases are built from --------------------------------------------------------------------

WORLD = dict(
    unet=("UNETLoader", {"unet_name": MODEL_FILE.name, "weight_dtype": "default"}),
    world=("CustVid_LoadShapesWorld", {"text_encoder_name": TEXT_FILE.name}),
    case=("CustVid_WorldCaseData", {"case": "orange_star_circle", "motion_clip": 0}),
    cond=("CustVid_WorldTextEncode", {"world_text": ["world", 0], "prompt": "a sks"}),
)
SUBJECT = {"vae": ["world", 1], "images": ["case", 0], "conditioning": ["cond", 0], "masks": ["case", 1],
           "prompt": "a sks", "trigger_words": "sks", "world_text": ["world", 0]}
CLIPS = {"vae": ["world", 1], "frames": ["case", 2], "conditioning": ["cond", 0]}
COMMON = dict(steps=1, learning_rate=1e-3, rank=2, batch_size=1, alignment_weight=0.0, alignment_block=1,
              timestep_sampling="uniform", shift=1.0, gradient_checkpointing=False, training_seed=0,
              checkpoint_every=100)
TRAIN_SUBJECT = dict(COMMON, roles="self_attn.q", run_name="probe", preservation_weight=1.0, region_loss=True,
                     trigger_embedding=True)
TRAIN_MOTION = dict(COMMON, roles="self_attn.v", run_name="probe_motion", spatial_rank=0, debiased_weight=1.0)
# A LoRA and a trigger embedding, trained once (1 step) before the cases; later prompts take them from the cache.
TRAINED = dict(WORLD, subject=("CustVid_SubjectDataset", SUBJECT),
               train=("CustVid_TrainSubjectLoRA", {"model": ["unet", 0], "subject": ["subject", 0], **TRAIN_SUBJECT}))
CLIP = dict(clip=("LoadVideo", {"file": MOTION_CLIP}), frames=("GetVideoComponents", {"video": ["clip", 0]}),
            raft=("CustVid_LoadRAFT", {"raft_name": "tiny_raft_small.pth"}))
MOTION_REP = dict(CLIP, rep=("CustVid_MotionRepresentation", {"raft": ["raft", 0], "frames": ["frames", 0],
                                                              "iterations": 2, "max_side": 512, "batch_size": 4}))
# The flow of the case's own motion clip, for motion training with alignment.
CASE_FLOW = dict(raft=CLIP["raft"], flow=("CustVid_MotionRepresentation", {"raft": ["raft", 0], "frames": ["case", 2],
                                                                            "iterations": 2, "max_side": 128,
                                                                            "batch_size": 4}))


def subject_training(**change):
    return graph(**WORLD, subject=("CustVid_SubjectDataset", SUBJECT),
                 train=("CustVid_TrainSubjectLoRA", {"model": ["unet", 0], "subject": ["subject", 0],
                                                     **dict(TRAIN_SUBJECT, **change)}), out=show("train", 1))


def motion_training(flow=False, **change):
    clips = {**CLIPS, "motion_representation": ["flow", 0]} if flow else CLIPS
    return graph(**WORLD, **(CASE_FLOW if flow else {}), clips=("CustVid_VideoDataset", clips),
                 train=("CustVid_TrainMotionLoRA", {"model": ["unet", 0], "clips": ["clips", 0],
                                                    **dict(TRAIN_MOTION, **change)}), out=show("train", 1))


def subject_dataset(**change):
    return graph(**WORLD, subject=("CustVid_SubjectDataset", {**SUBJECT, **change}), out=show("subject"))


def save_representation(name):
    return graph(**MOTION_REP, save=("CustVid_SaveRepresentation", {"representation": ["rep", 0], "file_name": name}))


def save_lora(name):
    return graph(**TRAINED, save=("CustVid_SaveLoRA", {"lora": ["train", 1], "filename": name, "trigger_words": "sks",
                                                       "overwrite": False}))


def save_embedding(name):
    return graph(**TRAINED, save=("CustVid_SaveTriggerEmbedding", {"trigger_embedding": ["train", 3],
                                                                   "filename": name, "overwrite": False}))


def synmotion(prompt="a blue square moving left", embeddings="syn_left.safetensors", **change):
    """Apply SynMotion Embeddings on the world's CLIP, the embeddings loaded from a file."""
    inputs = {"conditioning": ["cond", 0], "synmotion_embeddings": ["load", 0], "clip": ["clip", 0], "prompt": prompt,
              "motion_words": "", "subject_words": "", "subject": False, "strength": 1.0, **change}
    return graph(clip=("CustVid_LoadShapesWorldClip", {"text_encoder_name": TEXT_FILE.name}),
                 cond=("CLIPTextEncode", {"clip": ["clip", 0], "text": prompt}),
                 load=("CustVid_LoadSynMotionEmbeddings", {"synmotion_embeddings_name": embeddings}),
                 apply=("CustVid_ApplySynMotionEmbeddings", inputs), out=show("apply"))


def save_synmotion_embeddings(name):
    return graph(load=("CustVid_LoadSynMotionEmbeddings", {"synmotion_embeddings_name": "syn_left.safetensors"}),
                 save=("CustVid_SaveSynMotionEmbeddings", {"synmotion_embeddings": ["load", 0], "filename": name,
                                                           "overwrite": False}))


def apply_lora(schedule="1.0", lora_name="(use lora input)", model="unet", connected=True, preset="custom"):
    inputs = {"model": [model, 0], "lora_name": lora_name, "preset": preset, "schedule": schedule}
    if connected:
        inputs["lora"] = ["train", 1]
    nodes = dict(TRAINED) if connected else dict(WORLD)
    nodes["other"] = ("UNETLoader", {"unet_name": "bad_other_wan.safetensors", "weight_dtype": "default"})
    return graph(**nodes, apply=("CustVid_ApplyLoRASchedule", inputs), out=show("apply"))


def boxes(keyframes):
    return graph(boxes=("CustVid_SubjectBoxes", {"keyframes": keyframes}), out=show("boxes"))


def steering(blocks="all", subject_words="sks", prompt="a sks", text=True, **more):
    inputs = {"model": ["unet", 0], "boxes": ["boxes", 0], "prompt": prompt, "subject_words": subject_words,
              "alpha": 10.0, "tau": 0.3, "blocks": blocks, "background_words": "", **more}
    if text:
        inputs["world_text"] = ["world", 0]
    return graph(**WORLD, boxes=("CustVid_SubjectBoxes", {"keyframes": "0: 0.1, 0.1, 0.5, 0.5"}),
                 steer=("CustVid_BoxSteering", inputs), out=show("steer"))


def camera(**change):
    inputs = dict(sampler=["sampler", 0], pan_x=0.25, pan_y=0.0, zoom=1.0, camera_path="", window_start=0.2,
                  window_end=0.4, latent_layout="video latent (Wan: one latent frame per time step)", fill_seed=0)
    return graph(sampler=("KSamplerSelect", {"sampler_name": "euler"}),
                 camera=("CustVid_CameraShiftSampler", {**inputs, **change}), out=show("camera"))


def trigger(prompt="a sks circle", trigger_words=""):
    return graph(**TRAINED, cond2=("CustVid_WorldTextEncode", {"world_text": ["world", 0], "prompt": prompt}),
                 apply=("CustVid_ApplyTriggerEmbedding", {"conditioning": ["cond2", 0], "trigger_embedding": ["train", 3],
                                                          "prompt": prompt, "trigger_words": trigger_words,
                                                          "world_text": ["world", 0]}), out=show("apply"))


def loader(node, name_input, name):
    return graph(load=(node, {name_input: name, **({"precision": "auto"} if node == "CustVid_LoadDINOv2" else {})}),
                 out=show("load"))


def loaded_subject_rep(name):
    return graph(load=("CustVid_LoadSubjectRepresentation", {"representation_name": name}), out=show("load"))


def world_encoders(**change):
    photo = ("LoadImage", {"image": SUBJECT_PHOTO})
    inputs = {"dino": ["dino", 0], "images": ["photo", 0], "resolution": 56, "fit": "pad", "batch_size": 4, **change}
    return graph(photo=photo, dino=("CustVid_LoadDINOv2", {"dino_name": "dinov2-base/model.safetensors",
                                                           "precision": "auto"}),
                 rep=("CustVid_SubjectRepresentation", inputs), out=show("rep"))


# File names no file system takes or that leave the folder, for every node that writes a file a user names.
BAD_NAMES = {"empty": "", "blank": "   ", "suffix only": ".safetensors", "folder only": "bad_sub/",
             "blank in a folder": "bad_sub/  .safetensors", "NUL": "bad_\0name", "too long": "bad_" + "x" * 300,
             "parent": "../bad_escape", "absolute": "/tmp/bad_absolute", "dot": ".", "back out": "bad_sub/../../bad_out"}
NAMING_NODES = {"SaveRepresentation": (save_representation, "file_name"), "SaveLoRA": (save_lora, "filename"),
                "SaveTriggerEmbedding": (save_embedding, "filename"),
                "SaveSynMotionEmbeddings": (save_synmotion_embeddings, "filename"),
                "TrainSubjectLoRA": (lambda n: subject_training(run_name=n), "run_name"),
                "TrainMotionLoRA": (lambda n: motion_training(run_name=n), "run_name")}
CASES = {f"{node} {what}": (build(name), f"{input_name}:")
         for node, (build, input_name) in NAMING_NODES.items() for what, name in BAD_NAMES.items()
         # a run name is a folder: 'bad_sub/' and '.safetensors' are folder names
         if not (node.startswith("Train") and what in ("suffix only", "folder only", "blank in a folder"))}

# Strength schedules.
for text in ("nan", "inf", "-inf", "0:0.6, 0.3:nan", "0:inf, 0.5:1", "abc", "", "0.5:1", "0:1, 0.5", "0:1:2",
             "1:1", "0:1, 0.5:2, 0.3:1", "-0.1:1, 0.5:2", "0:1,, 0.5:x"):
    CASES[f"schedule {text!r}"] = (apply_lora(text), "schedule:")

# LoRAs made for another model, or damaged, on the merged (constant) and the per-step (changing) path.
for name in ("bad_lora_wide.safetensors", "bad_lora_deep.safetensors", "bad_lora_unknown_layer.safetensors",
             "bad_lora_empty.safetensors", "bad_lora_corrupt.safetensors", "bad_lora_code.pt",
             "bad_lora_list.pt", "bad_lora_text.ckpt", "bad_lora_rank.safetensors", "bad_lora_nothing_native.safetensors"):
    for path, schedule in (("constant", "0.8"), ("scheduled", "0:0.6, 0.3:0.8")):
        if path == "constant" and name == "bad_lora_nothing_native.safetensors":
            continue  # ComfyUI's own names, which its merged path reads
        CASES[f"{name} {path}"] = (apply_lora(schedule, lora_name=name, connected=False), "lora_name:")
for path, schedule in (("constant", "1.0"), ("scheduled", "0:0.6, 0.3:0.8")):
    CASES[f"lora of another model {path}"] = (apply_lora(schedule, model="other"), "lora:")
CASES["no lora at all"] = (apply_lora(connected=False), "lora_name:")

# Subject boxes.
for text in ("", "0: 0.1, 0.2, 0.3", "0: 0.5, 0.1, 0.4, 0.6", "2: 0, 0, 1, 1", "0: nan, 0, 1, 1", "x: 0, 0, 1, 1",
             "0: 0, 0, inf, 1", "0: -0.5, 0, 1, 1", "0 0.1 0.1 0.5 0.5", "0: 0.1, 0.5, 0.6, 0.2"):
    CASES[f"keyframes {text!r}"] = (boxes(text), "keyframes:")

# Box Steering.
for blocks in ("99", "0-99", "5-2", "-1", "a", "1,,2", "0-", "3-x", "6"):
    CASES[f"blocks {blocks!r}"] = (steering(blocks=blocks), "blocks:")
CASES["subject words not in the prompt"] = (steering(subject_words="dog"), "subject_words:")
CASES["subject words empty"] = (steering(subject_words="  "), "subject_words:")
CASES["background words not in the prompt"] = (steering(background_words="sky"), "background_words:")
CASES["no text encoder for the words"] = (steering(text=False), "clip:")

# Camera.
for path in ("x", "0.5: 2, 0", "nan: 0, 0", "0.5: nan, 0", "0.5: 0, 0, 0", "0.5: 0, 0, -1", "2: 0.1, 0",
             "0.5: 0.1", "0.5: 0.1, 0, 1, 7"):
    CASES[f"camera_path {path!r}"] = (camera(camera_path=path), "camera_path:")
CASES["camera window reversed"] = (camera(window_start=0.6, window_end=0.4), "window_start:")
CASES["camera window empty"] = (camera(window_start=0.4, window_end=0.4), "window_start:")

# Training inputs.
CASES["roles unknown"] = (subject_training(roles="self_attn.x"), "roles:")
CASES["roles empty"] = (subject_training(roles=" , "), "roles:")
CASES["alignment block beyond the model"] = (motion_training(flow=True, alignment_weight=1.0, alignment_block=63),
                                             "alignment_block:")
CASES["stillness without preservation clips"] = (subject_training(stillness_rank=4), "stillness_rank:")
CASES["decoded flow without a motion representation"] = (
    motion_training(alignment_weight=1.0, motion_alignment="decoded_flow"), "clips:")
CASES["moving clips without masks"] = (graph(**WORLD, subject=("CustVid_SubjectDataset", {
    **{k: v for k, v in SUBJECT.items() if k != "masks"}, "moving_clips": 1}), out=show("subject")), "moving_clips:")
CASES["moving frames off the VAE's step"] = (subject_dataset(moving_clips=1, moving_frames=7), "moving_frames:")
CASES["trigger words not in the prompt"] = (subject_dataset(trigger_words="dog"), "trigger_words:")
CASES["trigger words without a text encoder"] = (graph(**WORLD, subject=("CustVid_SubjectDataset", {
    **{k: v for k, v in SUBJECT.items() if k != "world_text"}}), out=show("subject")), "clip:")
CASES["masks of another count"] = (graph(**WORLD, one=("ImageFromBatch", {"image": ["case", 0], "batch_index": 0,
                                                                         "length": 1}),
                                         subject=("CustVid_SubjectDataset", {**SUBJECT, "images": ["one", 0]}),
                                         out=show("subject")), "masks:")
CASES["a one-frame clip"] = (graph(**WORLD, one=("ImageFromBatch", {"image": ["case", 2], "batch_index": 0,
                                                                   "length": 1}),
                                   clips=("CustVid_VideoDataset", {**CLIPS, "frames": ["one", 0]}),
                                   out=show("clips")), "frames:")
CASES["clips of another size chained"] = (graph(**WORLD, small=("ImageScale", {"image": ["case", 2],
                                                                             "upscale_method": "nearest-exact",
                                                                             "width": 64, "height": 64,
                                                                             "crop": "disabled"}),
                                                first=("CustVid_VideoDataset", CLIPS),
                                                clips=("CustVid_VideoDataset", {**CLIPS, "frames": ["small", 0],
                                                                                "add_to": ["first", 0]}),
                                                out=show("clips")), "frames:")
CASES["a motion representation of another clip"] = (graph(**WORLD, **MOTION_REP, clips=(
    "CustVid_VideoDataset", {**CLIPS, "motion_representation": ["rep", 0]}), out=show("clips")),
    "motion_representation:")
CASES["a subject representation of other photos"] = (graph(**WORLD, photo=("LoadImage", {"image": SUBJECT_PHOTO}),
                                                           dino=("CustVid_LoadDINOv2", {
                                                               "dino_name": "dinov2-base/model.safetensors",
                                                               "precision": "auto"}),
                                                           rep=("CustVid_SubjectRepresentation", {
                                                               "dino": ["dino", 0], "images": ["photo", 0],
                                                               "resolution": 56, "fit": "pad", "batch_size": 4}),
                                                           subject=("CustVid_SubjectDataset", {
                                                               **SUBJECT, "subject_representation": ["rep", 0]}),
                                                           out=show("subject")), "subject_representation:")

CASES["empty masks"] = (graph(**WORLD, none=("SolidMask", {"value": 0.0, "width": 32, "height": 32}),
                               empty=("MaskComposite", {"destination": ["case", 1], "source": ["none", 0], "x": 0,
                                                        "y": 0, "operation": "multiply"}),
                               subject=("CustVid_SubjectDataset", {**SUBJECT, "masks": ["empty", 0]}),
                               out=show("subject")), "masks:")

# Trigger embedding.
CASES["trigger words of another token count"] = (trigger(trigger_words="sks circle"), "trigger_words:")
CASES["trigger words not in the prompt to apply"] = (trigger(prompt="a red circle"), "trigger_words:")

# SynMotion embeddings.
CASES["synmotion motion words not in the prompt"] = (synmotion(prompt="a blue square moving up"), "motion_words:")
CASES["synmotion motion words of another token count"] = (synmotion(motion_words="moving"), "motion_words:")
CASES["synmotion motion words of other tokens"] = (synmotion(prompt="a blue square moving right",
                                                            motion_words="moving right"),
                                                  "motion_words: 'moving right' tokenizes in this prompt to other tokens")
CASES["synmotion motion words in another order"] = (synmotion(prompt="a blue square left moving"),
                                                    "or to the same in another order")
CASES["synmotion subject words not in the prompt"] = (synmotion(subject_words="green star", subject=True),
                                                     "subject_words:")
CASES["synmotion embeddings of another text width"] = (synmotion(embeddings="bad_syn_narrow.safetensors"),
                                                      "synmotion_embeddings:")
for name in ("bad_syn_corrupt.safetensors", "bad_syn_lora.safetensors", "bad_syn_trigger.safetensors"):
    CASES[f"Load SynMotion Embeddings {name}"] = (loader("CustVid_LoadSynMotionEmbeddings",
                                                         "synmotion_embeddings_name", name),
                                                  "synmotion_embeddings_name:")

# Loaders given files that are damaged, pickled with code, of another model, or of absurd sizes.
for name in ("bad_dino_wide/model.safetensors", "bad_dino_heads/model.safetensors", "bad_dino_json/model.safetensors",
             "bad_dino_code.pth", "bad_dino_empty.safetensors", "bad_dino_layers/model.safetensors"):
    CASES[f"Load DINOv2 {name}"] = (loader("CustVid_LoadDINOv2", "dino_name", name), "dino_name:")
for name in ("bad_raft_code.pth", "bad_raft_empty.pth", "bad_raft_dino.safetensors", "bad_raft_truncated.pth"):
    CASES[f"Load RAFT {name}"] = (loader("CustVid_LoadRAFT", "raft_name", name), "raft_name:")
for name in ("bad_rep_corrupt.safetensors", "bad_rep_lora.safetensors", "bad_rep_code.pt"):
    CASES[f"Load Subject Representation {name}"] = (loaded_subject_rep(name), "representation_name:")
for name in ("bad_emb_corrupt.safetensors", "bad_emb_lora.safetensors"):
    CASES[f"Load Trigger Embedding {name}"] = (loader("CustVid_LoadTriggerEmbedding", "trigger_embedding_name", name),
                                               "trigger_embedding_name:")

# Subject representation settings.
CASES["resolution off the patch grid"] = (world_encoders(resolution=58), "resolution:")


def _lora(width: int, blocks=(0, 1), rank=2, role="self_attn.q", inner=None):
    out = {}
    for b in blocks:
        key = f"diffusion_model.blocks.{b}.{role}"
        out[key + ".lora_down.weight"] = torch.randn(inner or rank, width) * 0.01
        out[key + ".lora_up.weight"] = torch.randn(width, rank) * 0.01
        out[key + ".alpha"] = torch.tensor(float(rank))
    return out


class _Payload:
    def __reduce__(self):
        return (print, ("CustVid probe: this must never run",))


def _write_bad_files(models):
    """Files a user could put in the wrong folder, or that arrived damaged or made for another model."""
    from custvid_core.representations.subject import build_dinov2

    loras = models / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file(_lora(256), str(loras / "bad_lora_wide.safetensors"))
    save_file(_lora(128, blocks=(0, 40)), str(loras / "bad_lora_deep.safetensors"))
    save_file({"diffusion_model.blocks.0.no_such_layer.lora_down.weight": torch.zeros(2, 128),
               "diffusion_model.blocks.0.no_such_layer.lora_up.weight": torch.zeros(128, 2)},
              str(loras / "bad_lora_unknown_layer.safetensors"))
    save_file({}, str(loras / "bad_lora_empty.safetensors"))
    (loras / "bad_lora_corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    torch.save({"w": torch.zeros(2), "code": _Payload()}, loras / "bad_lora_code.pt")
    torch.save([torch.zeros(2)], loras / "bad_lora_list.pt")
    (loras / "bad_lora_text.ckpt").write_text("not a checkpoint")
    save_file(_lora(128, inner=3), str(loras / "bad_lora_rank.safetensors"))
    save_file(_lora(128), str(loras / "probe_stock_lora.safetensors"))
    save_file({"lora_unet_blocks_0_self_attn_q.lora_A.weight": torch.zeros(2, 128),
               "lora_unet_blocks_0_self_attn_q.lora_B.weight": torch.zeros(128, 2)},
              str(loras / "bad_lora_nothing_native.safetensors"))
    # Another Wan with fewer blocks (2, the shapes world has 6).
    other = tiny_world(layers=2)
    save_world(other, models / "diffusion_models" / "bad_other_wan.safetensors", models / "bad_other_text.safetensors")

    dino = models / "custvid" / "dino"
    for folder, change in (("bad_dino_wide", {"hidden_size": 10 ** 9}), ("bad_dino_heads", {"num_attention_heads": 5}),
                           ("bad_dino_layers", {"num_hidden_layers": 100000}), ("bad_dino_json", None)):
        torch.manual_seed(0)
        from builders import TINY_DINO

        build_dinov2(TINY_DINO).model.save_pretrained(dino / folder)
        config = json.loads((dino / folder / "config.json").read_text())
        (dino / folder / "config.json").write_text("{not json" if change is None else json.dumps({**config, **change}))
    torch.save({"w": _Payload()}, dino / "bad_dino_code.pth")
    (dino / "bad_dino_empty.safetensors").write_bytes(b"")
    raft = models / "custvid" / "raft"
    torch.save({"w": _Payload()}, raft / "bad_raft_code.pth")
    (raft / "bad_raft_empty.pth").write_bytes(b"")
    save_file({k: v.contiguous() for k, v in build_dinov2(TINY_DINO).model.state_dict().items()},
              str(raft / "bad_raft_dino.safetensors"))
    (raft / "bad_raft_truncated.pth").write_bytes((raft / "tiny_raft_small.pth").read_bytes()[:5000])
    reps = models / "custvid" / "representations"
    reps.mkdir(parents=True, exist_ok=True)
    (reps / "bad_rep_corrupt.safetensors").write_bytes(b"\xff" * 64)
    save_file(_lora(128), str(reps / "bad_rep_lora.safetensors"))
    torch.save({"w": _Payload()}, reps / "bad_rep_code.pt")
    embeddings = models / "custvid" / "trigger_embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    (embeddings / "bad_emb_corrupt.safetensors").write_bytes(b"\x00" * 16)
    save_file(_lora(128), str(embeddings / "bad_emb_lora.safetensors"))
    synmotion = models / "custvid" / "synmotion"
    synmotion.mkdir(parents=True, exist_ok=True)
    (synmotion / "bad_syn_corrupt.safetensors").write_bytes(b"\x00" * 16)
    save_file(_lora(128), str(synmotion / "bad_syn_lora.safetensors"))
    save_trigger_embedding(synmotion / "bad_syn_trigger.safetensors", LearnedTrigger(torch.ones(1, 4096), "sks"))
    save_synmotion(synmotion / "syn_left.safetensors", _synmotion_embeddings(4096))
    save_synmotion(synmotion / "bad_syn_narrow.safetensors", _synmotion_embeddings(8))


def _synmotion_embeddings(text_dim):
    g = torch.Generator().manual_seed(0)
    return LearnedSynMotion(torch.randn(1, text_dim, generator=g), torch.randn(2, text_dim, generator=g), None,
                            "red circle", "moving left", 2)


@pytest.fixture(scope="module")
def probe_server(comfy_server):
    _write_bad_files(comfy_server.base / "models")
    trained = run(comfy_server, graph(**TRAINED, out=show("train", 1)))
    assert trained["ok"], trained["error"]
    return comfy_server


def _files(base):
    return {p for p in base.rglob("*") if p.is_file() and "user" not in p.relative_to(base).parts[:1]}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_name_and_writes_nothing(probe_server, case):
    prompt, message = CASES[case]
    before = _files(probe_server.base)
    result = run(probe_server, prompt)
    assert not result["ok"]
    error = result["error"]
    assert error is not None, f"refused before running, by ComfyUI's validation: {result['validation']}"
    assert error["exception_type"] == "CustVid.InputError", (error["exception_type"], error["exception_message"])
    assert message in error["exception_message"], error["exception_message"]
    assert "weights_only" not in error["exception_message"]
    written = _files(probe_server.base) - before - {probe_server.log}
    assert not written, written
    assert probe_server.alive()


def test_the_synmotion_cases_run_when_nothing_is_wrong(probe_server):
    """The graph the SynMotion cases change one input of runs through the server as it is."""
    result = run(probe_server, synmotion(subject=True, subject_words="blue square"))
    assert result["ok"], result["error"]


def test_the_probe_covers_at_least_a_hundred_cases():
    assert len(CASES) >= 100, len(CASES)


def test_a_reused_run_name_resumes_only_its_own_run_and_says_so(probe_server):
    """Through the server: the node's UI and the console say what became of the run's checkpoint."""
    def train(**change):
        result = run(probe_server, subject_training(**{"run_name": "probe_reuse", "steps": 2, **change}))
        assert result["ok"], result["error"]
        return result["outputs"]["train"]["text"][0]

    assert train() == "trained 2 steps"
    # A setting that leaves what is learned alone: ComfyUI runs the node again, the checkpoint is the same run's.
    # The frontend shows it under the node too.
    result, texts = run_watching(probe_server, subject_training(run_name="probe_reuse", steps=2, checkpoint_every=99))
    assert result["ok"] and result["outputs"]["train"]["text"] == ["run_name 'probe_reuse': already trained (2 steps)"]
    assert ("train", "run_name 'probe_reuse': already trained (2 steps)") in texts
    assert train(steps=3) == "run_name 'probe_reuse': resumed from step 2 of 3"
    folder = probe_server.base / "output" / "custvid_training" / "probe_reuse"
    other = train(steps=3, rank=4)
    assert other == (f"run_name 'probe_reuse': trained afresh: '{folder}' held a checkpoint of another run "
                     "(other settings (rank)); it is kept as checkpoint.previous.pt")
    # Other photos: the case's photos flipped.
    flipped = graph(flip=("ImageFlip", {"image": ["case", 0], "flip_method": "x-axis: vertically"}),
                    subject=("CustVid_SubjectDataset", {**SUBJECT, "images": ["flip", 0]}))
    with_lora = graph(stock=("LoraLoaderModelOnly", {"model": ["unet", 0], "lora_name": "probe_stock_lora.safetensors",
                                                     "strength_model": 1.0}))

    def train_on(*changes):
        prompt = subject_training(run_name="probe_reuse", steps=3, rank=4)
        for change in changes:
            prompt.update(change)
        if "stock" in prompt:
            prompt["train"]["inputs"]["model"] = ["stock", 0]
        result = run(probe_server, prompt)
        assert result["ok"], result["error"]
        return result["outputs"]["train"]["text"][0]

    assert "(other data)" in train_on(flipped)
    # The same model with a stock LoRA applied is another base; without it again, the same base as before.
    assert "(other model)" in train_on(flipped, with_lora)
    assert train_on(flipped) == "run_name 'probe_reuse': already trained (3 steps)"
    assert "CustVid run_name 'probe_reuse': resumed from step 2 of 3" in probe_server.log.read_text()


def test_draw_boxes_refuses_an_empty_batch():
    pack = import_pack()
    from custvid_pack.nodes.control_nodes import DrawBoxes

    track = pack.nodes.control_nodes.BoxTrack.parse("0: 0.1, 0.1, 0.5, 0.5")
    with pytest.raises(ValueError, match="^images: the batch is empty"):
        DrawBoxes.execute(torch.zeros(0, 32, 32, 3), track)
    assert DrawBoxes.execute(torch.zeros(2, 32, 32, 3), track).result[0].shape == (2, 32, 32, 3)
