"""Nodes that learn a subject and a motion as LoRAs on the user's own Wan model (SMRABooth's recipe
with MotionBooth's subject losses), apart or jointly (DualReal's dual-aware training, optionally with its
StageBlender controller weighing the two), and save them where ComfyUI's LoRA loaders find them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from comfy_api.latest import io, ui

from ..custvid_core.adapters.dualreal import DualRealWeights
from ..custvid_core.adapters.lora import (
    MOTION_ROLES,
    SUBJECT_ROLES,
    LoraWeights,
    native_lora_modules,
    save_lora,
)
from ..custvid_core.adapters.lora import base_model_signature as lora_base_model
from ..custvid_core.adapters.stage_blender import dualreal_parts
from ..custvid_core.backbones import describe
from ..custvid_core.errors import InputError
from ..custvid_core.media import loss_plot
from ..custvid_core.training import (
    JointController,
    MemorySettings,
    MotionSettings,
    OptimSettings,
    SigmaSampler,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    append_clips,
    append_photos,
    clip_set,
    joint_dualreal,
    subject_set,
    train_joint,
    train_motion,
    train_subject,
)
from ..custvid_core.training.buckets import BucketRule
from ..custvid_core.training.customize import MOTION_ALIGNMENT
from ..custvid_core.training.datasets import Bucketed, buckets_of, converted
from ..custvid_core.training.loop import warmup_steps
from ..custvid_core.training.objectives import EXPERT_BOUNDARY, NOISE_RANGES, SIGMA_SAMPLING, expert_range
from . import types
from .host import (
    TRAINING_DTYPES,
    attached_per_call,
    base_model_signature,
    decoder_with_grad,
    offload_device,
    plain,
    progress_callback,
    resolve_training_dtype,
    safetensors_path,
    show_on_node,
    token_roles,
    training_clone,
    training_folder,
    training_progress,
)
from .preview import preview_inputs, preview_ui, previewer

CATEGORY_DATA = "CustVid/training data"
CATEGORY_TRAIN = "CustVid/training"


def _context(conditioning, input_name: str) -> torch.Tensor:
    if not conditioning or not isinstance(conditioning[0][0], torch.Tensor):
        raise InputError(input_name, "is empty", "the output of a text encode node (CONDITIONING)")
    return conditioning[0][0].float().cpu()


def _clip_features(clip_vision_output) -> torch.Tensor | None:
    """CLIP Vision Encode's penultimate hidden states `[N, 257, D]`: what Wan 2.1 I2V's image embedding reads
    (WanImageToVideo passes the same)."""
    if clip_vision_output is None:
        return None
    features = getattr(clip_vision_output, "penultimate_hidden_states", None)
    if not torch.is_tensor(features) or features.ndim != 3:
        raise InputError("clip_vision_output", "holds no penultimate hidden states", "the output of CLIP Vision Encode")
    return features.float().cpu()


def image_to_video_inputs(items: str, start: str) -> list:
    """A dataset node's image-to-video inputs (optional, after all its other inputs)."""
    return [
        io.Boolean.Input("image_to_video", default=False, optional=True,
                         tooltip=f"For training an image-to-video Wan (Wan 2.1 or 2.2 I2V): {start} is also encoded as "
                                 f"the start image the model continues from, as WanImageToVideo encodes it. Off for "
                                 f"text-to-video models (they ignore start images)."),
        io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                  tooltip=f"For Wan 2.1 I2V (its model reads CLIP image features): CLIP Vision Encode "
                                          f"(clip_vision_h, crop none) of {items}' start images: one image for all "
                                          f"or one per item. Needs image_to_video on. Wan 2.2 I2V takes none."),
    ]


def _encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """The core's `encode` over a ComfyUI VAE: clips `[N, F, H, W, 3]` -> latents, one clip at a time."""
    return lambda clips: torch.cat([vae.encode(c[..., :3]).float().cpu() for c in clips])


def bucket_inputs(item: str) -> list:
    """A dataset node's size buckets: optional and after all its other inputs."""
    return [
        io.Boolean.Input("buckets", default=False, optional=True,
                         tooltip=f"On: {item} of other sizes, aspect ratios and lengths than the earlier ones (add_to) "
                                 "are each scaled and centre-cropped to a size bucket (the aspect ratio nearest "
                                 "theirs within bucket_width x bucket_height pixels, on the model's grid) and clips "
                                 "trimmed to a length the VAE encodes whole (1 + 4k on Wan); each training batch "
                                 "comes from one bucket. Off: every item must have the first one's size and length. "
                                 "Use it on every dataset node of a chain."),
        io.Int.Input("bucket_width", default=832, min=16, max=4096, step=16, optional=True,
                     tooltip="With buckets: the pixel budget's width; every bucket holds at most bucket_width x "
                             "bucket_height pixels (832 x 480 is Wan's 480p)."),
        io.Int.Input("bucket_height", default=480, min=16, max=4096, step=16, optional=True,
                     tooltip="With buckets: the pixel budget's height."),
    ]


def _bucket_rule(vae, buckets: bool, width: int, height: int) -> BucketRule | None:
    """The buckets for this VAE: sides on its stride times Wan's 2x2 patch, frames it encodes whole (a VAE whose
    latent frame count is a formula that gives one latent frame for one pixel frame encodes 1 + k steps)."""
    if not buckets:
        return None
    formula = getattr(vae, "downscale_ratio", None)
    first_alone = isinstance(formula, tuple) and callable(formula[0]) and formula[0](1) == 1
    return BucketRule(width, height, grid=int(vae.spacial_compression_encode()) * 2,
                      frame_step=vae.temporal_compression_decode() or 1, first_frame_alone=first_alone)


def _dataset_output(data, item: str) -> io.NodeOutput:
    """The dataset, with its buckets (if any) listed under the node."""
    if not isinstance(data, Bucketed):
        return io.NodeOutput(data)
    text = f"{len(data.sets)} bucket{'s' if len(data.sets) > 1 else ''}:\n" + "\n".join(data.describe(item))
    show_on_node(text)
    return io.NodeOutput(data, ui=ui.PreviewText(text))


class VideoDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_VideoDataset",
            display_name="Video Clips Dataset",
            category=CATEGORY_DATA,
            description="Encodes a clip once (latents, prompt, optional RAFT motion) for training. Chain "
                        "several through add_to. Used as motion clips, or as preservation clips for a subject.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you train (Wan 2.1 VAE for Wan 2.1 models)."),
                io.Image.Input("frames", tooltip="The frames of one clip (a video loaded as an IMAGE batch). "
                                                 "Wan needs 1 + 4k frames (e.g. 17, 33, 81); at least 5."),
                io.Conditioning.Input("conditioning", tooltip="The clip's caption, encoded by your text encoder. "
                                                              "For a motion, include its trigger word (e.g. 'mtn')."),
                types.MotionRepresentation.Input("motion_representation", optional=True,
                                                 tooltip="RAFT flow of this clip (Motion Representation), for "
                                                         "motion alignment (MoRA). Optional."),
                types.VideoDataset.Input("add_to", optional=True,
                                         tooltip="Clips encoded earlier; this clip is appended. All clips need "
                                                 "the same frame count and size."),
                io.Int.Input("hue_copies", default=0, min=0, max=7, optional=True,
                             tooltip="Also add this many copies of the clip with its colours turned round the colour "
                                     "circle (same caption, same motion), so a motion LoRA cannot learn the clip's "
                                     "colours and pass them to your subject. Try 3 on motion clips if your subject "
                                     "takes on their colours; 0 (off) for preservation clips. Each copy is encoded "
                                     "once, here."),
                *bucket_inputs("clips"),
                *image_to_video_inputs("the clip", "the clip's first frame (and each hue copy's)"),
            ],
            outputs=[types.VideoDataset.Output(display_name="clips")],
        )

    @classmethod
    def execute(cls, vae, frames, conditioning, motion_representation=None, add_to=None,
                hue_copies=0, buckets=False, bucket_width=832, bucket_height=480, image_to_video=False,
                clip_vision_output=None) -> io.NodeOutput:
        flow = None if motion_representation is None else motion_representation.flow
        rule = _bucket_rule(vae, buckets, bucket_width, bucket_height)
        clips = clip_set(frames, _encoder(vae), _context(conditioning, "conditioning"), flow, hue_copies=hue_copies,
                         progress=progress_callback(1), buckets=rule, start_images=image_to_video,
                         clip_features=_clip_features(clip_vision_output))
        return _dataset_output(clips if add_to is None else append_clips(add_to, clips, bucketed=buckets), "clips")


class SubjectDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SubjectDataset",
            display_name="Subject Dataset",
            category=CATEGORY_DATA,
            description="Encodes your subject's photos once (latents, masks, prompt, optional DINOv2 features) "
                        "for subject LoRA training, with optional preservation clips.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the model you train."),
                io.Image.Input("images", tooltip="3 to 10 photos of your subject (one IMAGE batch)."),
                io.Conditioning.Input("conditioning",
                                      tooltip="The training prompt with a rare trigger word, e.g. 'a sks dog'."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Subject masks, one per photo, same size. With masks the loss counts only "
                                      "the subject (MotionBooth's region loss)."),
                types.SubjectRepresentation.Input("subject_representation", optional=True,
                                                  tooltip="DINOv2 features of the same photos, for subject "
                                                          "alignment (SuRA). Optional."),
                types.VideoDataset.Input("preservation", optional=True,
                                         tooltip="Any captioned clips, trained in alternation so the model keeps "
                                                 "making video (MotionBooth's preservation loss). Optional."),
                types.SubjectDataset.Input("add_to", optional=True,
                                           tooltip="Photos encoded earlier (another Subject Dataset); these are "
                                                   "appended. Photos of one dataset share a size."),
                io.String.Input("prompt", default="", optional=True,
                                tooltip="The training prompt exactly as encoded (e.g. 'a sks dog'). With trigger_words "
                                        "and clip it turns on MotionBooth's subject-token attention "
                                        "loss (with masks) and lets Train Subject LoRA learn a trigger embedding."),
                io.String.Input("trigger_words", default="", optional=True,
                                tooltip="The subject's words in the prompt (e.g. 'sks dog'): with masks, their "
                                        "cross-attention is trained to cover the mask; a trigger embedding is "
                                        "learned at them."),
                *types.tokenizer_inputs("trigger words"),
                io.Int.Input("moving_clips", default=0, min=0, max=16, optional=True,
                             tooltip="Per photo, this many short clips of the subject (cut out by its mask) "
                                     "sliding along a random straight path over the photo's background, its place "
                                     "filled in. Train Subject LoRA learns them in turn with the photos, so the "
                                     "subject is not learned as something that stands still. Needs masks. 0: off."),
                io.Int.Input("moving_frames", default=17, min=2, max=121, optional=True,
                             tooltip="Frames of each moving clip: 1 + 4k on Wan (17 is about a second), a "
                                     "multiple of 5 on the shapes world."),
                io.Float.Input("moving_travel", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="How far the subject slides over a clip, as a share of the photo's width "
                                       "(each clip draws 75% to 100% of it; shortened where the photo has no "
                                       "room)."),
                *bucket_inputs("photos"),
                *image_to_video_inputs("the photos", "each photo is its own start image and each moving clip's first "
                                       "frame"),
            ],
            outputs=[types.SubjectDataset.Output(display_name="subject")],
        )

    @classmethod
    def execute(cls, vae, images, conditioning, masks=None, subject_representation=None,
                preservation=None, add_to=None, prompt="", trigger_words="", clip=None,
                world_text=None, moving_clips=0, moving_frames=17, moving_travel=0.3, buckets=False, bucket_width=832,
                bucket_height=480, image_to_video=False, clip_vision_output=None) -> io.NodeOutput:
        words = " ".join(trigger_words.split())
        subject_tokens = token_roles(prompt, words, clip or world_text, words_input="trigger_words").subject \
            if words else None
        photos = subject_set(images, _encoder(vae), _context(conditioning, "conditioning"), masks,
                             subject_representation, preservation, subject_tokens, words, moving_clips, moving_frames,
                             (0.75 * moving_travel, moving_travel), frame_step=vae.temporal_compression_decode() or 1,
                             progress=progress_callback(1), buckets=_bucket_rule(vae, buckets, bucket_width, bucket_height),
                             start_images=image_to_video, clip_features=_clip_features(clip_vision_output))
        return _dataset_output(photos if add_to is None else append_photos(add_to, photos, bucketed=buckets), "photos")


def noise_and_memory_inputs() -> list:
    """The noise levels a train node draws and whether it recomputes activations (every train node has them)."""
    return [
        io.Combo.Input("timestep_sampling", options=list(SIGMA_SAMPLING), default="logit_normal",
                       tooltip="How noise levels are drawn for training."),
        io.Float.Input("shift", default=1.0, min=0.1, max=20.0, step=0.1,
                       tooltip="Shift of the drawn noise levels (higher: more training at high noise)."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in the backward pass: much less memory, ~30% slower."),
    ]


def memory_inputs() -> list:
    """A LoRA train node's further memory savings: optional and after all its other inputs."""
    return [
        io.Int.Input("recompute_every", default=1, min=1, max=8, optional=True,
                     tooltip="With gradient_checkpointing: recompute only every k-th block in the backward pass, the "
                             "others keeping their activations. 1: every block (least memory); 2 or 3: faster, more "
                             "memory. The LoRA learned is the same."),
        io.Boolean.Input("offload_activations", default=False, optional=True,
                         tooltip="Keep what the backward pass needs in CPU memory instead of on the GPU, copied back "
                                 "when needed (with gradient_checkpointing: only each block's input, small; without: "
                                 "every activation). Less GPU memory for long clips, slower. The LoRA learned is the "
                                 "same."),
        io.Int.Input("blocks_to_swap", default=0, min=0, max=64, optional=True,
                     tooltip="Keep the weights of the model's last N blocks in CPU memory and bring each to the GPU "
                             "just before it runs (and before its recomputation in the backward pass; such blocks are "
                             "always recomputed), the next block copied while one computes. For models whose weights "
                             "leave too little GPU memory to train (e.g. Wan 14B on 24 GB). ComfyUI itself loads a "
                             "model that does not fit only partly and streams the layers it left in CPU memory as "
                             "they run (its low-VRAM loading, whatever this says), but it leaves room for sampling, "
                             "not for training: N moves N more blocks off the GPU. 0: off, ComfyUI's loading only. "
                             "Slower: each swapped block is copied to the GPU at least twice a step. The LoRA learned is the "
                             "same."),
    ]


def noise_range_inputs() -> list:
    """A train node's range of noise levels, for one expert of a two-expert model (Wan 2.2 A14B): optional, last."""
    return [
        io.Combo.Input("noise_range", options=list(NOISE_RANGES), default="all", optional=True,
                       tooltip="Which noise levels the run learns. all: every level (one model; or, with "
                               "model_low_noise connected, each expert its own side of expert_boundary). high_noise: "
                               "only those above expert_boundary, for Wan 2.2 A14B's high-noise expert; low_noise: "
                               "only those below, for its low-noise expert. The drawn levels keep their distribution "
                               "(timestep_sampling, shift) inside the range."),
        io.Float.Input("expert_boundary", default=EXPERT_BOUNDARY["t2v"], min=0.01, max=0.99, step=0.005,
                       optional=True,
                       tooltip="The noise level (timestep / 1000) where Wan 2.2 A14B's sampling passes from the "
                               "high-noise to the low-noise expert: 0.875 for text-to-video, 0.9 for image-to-video. "
                               "Split your sampling steps at the same level."),
    ]


def noise_levels(timestep_sampling: str, shift: float, noise_range: str = "all",
                 expert_boundary: float = EXPERT_BOUNDARY["t2v"]) -> SigmaSampler:
    """The noise levels a train node's inputs ask for (`noise_and_memory_inputs`, `noise_range_inputs`)."""
    return SigmaSampler(timestep_sampling, shift).within(*expert_range(noise_range, expert_boundary))


def low_noise_model_input():
    return io.Model.Input("model_low_noise", optional=True,
                          tooltip="Wan 2.2 A14B's low-noise expert (its second Load Diffusion Model), to learn a LoRA "
                                  "for each expert in one node: model (the high-noise expert) learns the noise levels "
                                  "above expert_boundary, this one those below, each in its own run of steps steps "
                                  "(checkpoints under run_name/high_noise and run_name/low_noise). Its MODEL and "
                                  "LoRA are the last two outputs. Leave noise_range at all.")


@dataclass
class _ExpertRun:
    model: Any
    trained: Any
    notes: list[str]
    folder: str  # the run's folder (its checkpoint, its previews)


def _train_experts(model, model_low_noise, noise_range: str, boundary: float, run_name: str, sigmas: SigmaSampler,
                   train_one: Callable[[Any, SigmaSampler, str, Callable[[str], None]], Any]) -> list[_ExpertRun]:
    """`train_one(model, sigmas, folder, log)` on `model` within `noise_range`, or, with `model_low_noise`, on each
    expert within its side of `boundary` (the high-noise run first)."""
    if model_low_noise is None:
        runs = [(model, expert_range(noise_range, boundary), run_name)]
    elif noise_range != "all":
        raise InputError("noise_range", f"'{noise_range}' with model_low_noise connected",
                         "'all' (each expert learns its side of expert_boundary), or model_low_noise disconnected")
    else:
        runs = [(model, expert_range("high_noise", boundary), f"{run_name}/high_noise"),
                (model_low_noise, expert_range("low_noise", boundary), f"{run_name}/low_noise")]
    done = []
    for expert, (low, high), name in runs:
        notes, log = _run_log(name)
        folder = training_folder(name)
        done.append(_ExpertRun(expert, train_one(expert, sigmas.within(low, high), folder, log), notes, folder))
    return done


def _memory(recompute_every: int, offload_activations: bool, blocks_to_swap: int) -> MemorySettings:
    return MemorySettings(recompute_every, offload_activations, blocks_to_swap, str(offload_device()))


def _learning_rate_input():
    return io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-6,
                          tooltip="AdamW learning rate after warm-up; cosine decay to a tenth of it.")


def _batch_input():
    return io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Items per step.")


def _alignment_block_input():
    return io.Int.Input("alignment_block", default=3, min=0, max=63,
                        tooltip="The block whose hidden states are aligned (SMRABooth: block 3).")


def _common_inputs(default_rank: int, default_alignment: float, roles: tuple[str, ...]) -> list:
    return [
        io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Training steps (batches)."),
        _learning_rate_input(),
        io.Int.Input("rank", default=default_rank, min=1, max=256, tooltip="LoRA rank."),
        io.String.Input("roles", default=", ".join(roles),
                        tooltip="Which linear layers of every block get the LoRA, comma-separated: "
                                "self_attn.q/k/v/o, cross_attn.q/k/v/o, ffn.0, ffn.2."),
        _batch_input(),
        io.Float.Input("alignment_weight", default=default_alignment, min=0.0, max=10.0, step=0.01,
                       tooltip="Weight of the representation alignment loss (needs representations in the "
                               "dataset); 0 turns it off."),
        _alignment_block_input(),
        *noise_and_memory_inputs(),
        *_run_inputs("custvid_run"),
    ]


def _run_inputs(run_name: str) -> list:
    """A LoRA train node's seed and checkpoint inputs."""
    return [
        io.Int.Input("training_seed", default=0, min=0, max=2 ** 31 - 1,
                     tooltip="Seed for noise, batches and LoRA initialisation (fixed, so a rerun resumes)."),
        io.Int.Input("checkpoint_every", default=100, min=1, max=100000,
                     tooltip="Write a checkpoint every N steps; a rerun with the same run_name resumes."),
        io.String.Input("run_name", default=run_name,
                        tooltip="Folder under output/custvid_training/ for this run's checkpoint. A rerun with the "
                                "same data, settings and model resumes it; another run trains afresh and keeps "
                                "the earlier checkpoint beside its own."),
    ]


def _training_dtype_input():
    return io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="auto", optional=True,
                          tooltip="The precision of the training data and the LoRA's math, whatever your model's "
                                  "file or weight_dtype (fp16, bf16, fp8, scaled fp8: the weights stay as loaded). "
                                  "auto: bf16 on a GPU that supports it, else fp32 (CPU). fp16: for GPUs without "
                                  "bf16; trains with a loss scale. The LoRA itself is kept and saved in fp32.")


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in text.split(",") if r.strip())


def _train_outputs():
    return [io.Model.Output(display_name="model"), io.LoraModel.Output(display_name="lora"),
            io.Image.Output(display_name="loss_graph")]


def _run_log(run_name: str) -> tuple[list[str], Callable[[str], None]]:
    """What became of the run's checkpoint (resumed, already trained, trained afresh): on the console and
    under the node, as soon as it is known (and, through `_finish`, in the node's UI output)."""
    notes: list[str] = []

    def log(message: str) -> None:
        notes.append(f"run_name '{run_name}': {message}")
        logging.info(f"CustVid {notes[-1]}")
        show_on_node(notes[-1])

    return notes, log


def _lora_weights(model, trained, trigger_words: str = "") -> LoraWeights:
    """A run's main LoRA as the LORA output, keeping what Save LoRA writes into the file beside the tensors."""
    return LoraWeights(trained.tensors, trained.spec, lora_base_model(describe(model.model.diffusion_model)),
                       trigger_words)


def _with_loras(model, loras: list[LoraWeights]):
    """A clone of `model` with the LoRAs applied at 1.0 by ComfyUI's own LoRA loading."""
    import comfy.sd

    for lora in loras:
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    return model


def _finish(model, trained, notes: list[str], *more, trigger_words: str = "", loras: list | None = None,
            patched=None, folders: tuple[str, ...] = ()) -> io.NodeOutput:
    """The train node's outputs: the MODEL with the LoRAs (by default the run's main LoRA; `patched`: the MODEL
    made otherwise), the LoRAs, the loss graph (previews marked) and `more`; the run's notes shown on the node, with
    the latest preview of each of its runs' `folders`."""
    loras = loras or [_lora_weights(model, trained, trigger_words)]
    patched = _with_loras(model, loras) if patched is None else patched
    text = "\n".join(notes or [f"trained {len(trained.history)} steps"])
    show_on_node(text)
    shown = preview_ui(folders, text) if folders else ui.PreviewText(text)
    return io.NodeOutput(patched, *loras, loss_plot(trained.history), *more, ui=shown)


def _finish_experts(runs: list[_ExpertRun], *more, trigger_words: str = "") -> io.NodeOutput:
    """`_finish` for a LoRA train node's runs (one model's, or the high- and low-noise experts'), with the low-noise
    expert's MODEL and LoRA as the last two outputs (None without one) and a loss graph per run."""
    first, *rest = runs
    out = _finish(first.model, first.trained, [n for run in runs for n in run.notes], *more, trigger_words=trigger_words,
                  folders=tuple(run.folder for run in runs))
    if not rest:
        return io.NodeOutput(*out.args, None, None, ui=out.ui)
    low = rest[0]
    lora = _lora_weights(low.model, low.trained, trigger_words)
    model, first_lora, graph, *others = out.args
    return io.NodeOutput(model, first_lora, torch.cat([graph, loss_plot(low.trained.history)]), *others,
                         _with_loras(low.model, [lora]), lora, ui=out.ui)


def _low_noise_outputs() -> list:
    return [io.Model.Output(display_name="model_low_noise"), io.LoraModel.Output(display_name="lora_low_noise")]


def _data_in(to_model, data: SubjectSet | VideoSet) -> SubjectSet | VideoSet:
    """A dataset as the model takes it: its latents (and stills, moving and preservation clips') in the model's
    own latent format, every tensor usable by autograd."""
    return converted(data, lambda latents: plain(to_model(latents)), plain)


class TrainSubjectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_TrainSubjectLoRA",
            display_name="Train Subject LoRA",
            category=CATEGORY_TRAIN,
            description="Learns your subject as a LoRA on q, k and ffn.0 (SMRABooth), with MotionBooth's region and "
                        "preservation losses and DINOv2 alignment. The input MODEL is not changed.",
            inputs=[io.Model.Input("model", tooltip="A Wan model from Load Diffusion Model (LoRAs may be applied)."),
                    types.SubjectDataset.Input("subject", tooltip="From Subject Dataset."),
                    *_common_inputs(32, 0.05, SUBJECT_ROLES),
                    io.Float.Input("preservation_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                                   tooltip="Weight of the preservation clips' loss (if the dataset has clips)."),
                    io.Boolean.Input("region_loss", default=True,
                                     tooltip="Count only the subject's region (needs masks in the dataset)."),
                    io.Int.Input("stillness_rank", default=0, min=0, max=256, optional=True,
                                 tooltip="Rank of a throw-away stillness LoRA (Still-Moving): it learns single "
                                         "frames of the preservation clips and runs, frozen, while the subject "
                                         "LoRA learns, so the subject LoRA learns the photos' look and not their "
                                         "stillness. For models that see a photo as a still clip (the shapes "
                                         "world: 32); needs preservation clips; every third step is its own. "
                                         "0: off."),
                    io.Int.Input("region_margin", default=0, min=0, max=16, optional=True,
                                 tooltip="Latent cells added around the mask for the region loss, so it also sees "
                                         "the subject's outline against the background. On Wan a latent cell "
                                         "covers 8x8 pixels and the mask already reaches past the outline: 0. On "
                                         "the shapes world, whose latent is as fine as its pixels: 3."),
                    io.Boolean.Input("trigger_embedding", default=False, optional=True,
                                     tooltip="Also learn a trigger embedding (SynMotion's subject embedding): a "
                                             "correction to the trigger words' rows of the text conditioning, "
                                             "learned with the LoRA on the photos. It helps the model draw a shape "
                                             "it has no word for. Needs trigger_words in Subject Dataset; use it "
                                             "with Apply Trigger Embedding, keep it with Save Trigger Embedding."),
                    io.Float.Input("moving_share", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                                   tooltip="If the dataset has moving clips (Subject Dataset's moving_clips): the "
                                           "share of the photo steps that learn from them instead of the photos."),
                    _training_dtype_input(),
                    *memory_inputs(),
                    *noise_range_inputs(),
                    low_noise_model_input(),
                    *preview_inputs()],
            outputs=[*_train_outputs(), types.TriggerEmbedding.Output(display_name="trigger_embedding"),
                     *_low_noise_outputs()],
        )

    @classmethod
    def execute(cls, model, subject, steps, learning_rate, rank, roles, batch_size, alignment_weight,
                alignment_block, timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every,
                run_name, preservation_weight, region_loss, stillness_rank=0, region_margin=0,
                trigger_embedding=False, moving_share=0.5, training_dtype="auto", recompute_every=1,
                offload_activations=False, blocks_to_swap=0, noise_range="all", expert_boundary=EXPERT_BOUNDARY["t2v"],
                model_low_noise=None, preview_every=0, preview_prompt="", clip=None, vae=None) -> io.NodeOutput:
        if trigger_embedding and model_low_noise is not None:
            raise InputError("trigger_embedding", "on with model_low_noise connected: both experts read one prompt, "
                             "and each expert's run would learn a trigger embedding of its own",
                             "off, or one expert per node")
        settings = SubjectSettings(
            rank=rank, roles=_roles(roles), batch=batch_size, sigmas=SigmaSampler(timestep_sampling, shift),
            optim=OptimSettings(steps=steps, lr=learning_rate, seed=training_seed, checkpoint_every=checkpoint_every,
                                warmup=warmup_steps(steps), preview_every=preview_every),
            region_loss=region_loss, preservation_weight=preservation_weight, alignment_weight=alignment_weight,
            alignment_block=alignment_block, gradient_checkpointing=gradient_checkpointing,
            stillness_rank=stillness_rank, region_margin=region_margin, trigger_embedding=trigger_embedding,
            moving_share=moving_share, memory=_memory(recompute_every, offload_activations, blocks_to_swap))

        def train_one(expert, sigmas, folder, log):
            with training_clone(expert) as (clone, backbone, device, to_model):
                return train_subject(backbone, _data_in(to_model, subject), replace(settings, sigmas=sigmas), folder,
                                     training_progress(steps, "subject LoRA"), log, device=device,
                                     dtype=resolve_training_dtype(training_dtype, device),
                                     base_model=base_model_signature(expert),
                                     preview=previewer(clone, subject, preview_every, preview_prompt, clip, vae, steps))

        runs = _train_experts(model, model_low_noise, noise_range, expert_boundary, run_name, settings.sigmas, train_one)
        return _finish_experts(runs, runs[0].trained.learned_trigger(), trigger_words=subject.trigger_words)


class TrainMotionLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_TrainMotionLoRA",
            display_name="Train Motion LoRA",
            category=CATEGORY_TRAIN,
            description="Learns the motion of your clips as a LoRA on v, o and the FFN (SMRABooth), with a "
                        "throw-away spatial LoRA absorbing their appearance, the appearance-debiased loss and "
                        "RAFT motion alignment. The input MODEL is not changed.",
            inputs=[io.Model.Input("model", tooltip="A Wan model from Load Diffusion Model (LoRAs may be applied)."),
                    types.VideoDataset.Input("clips", tooltip="From Video Clips Dataset: 1 to 5 clips of the motion."),
                    *_common_inputs(64, 1.0, MOTION_ROLES),
                    io.Int.Input("spatial_rank", default=32, min=0, max=256,
                                 tooltip="Rank of the throw-away spatial LoRA (q, k, ffn.0); 0: no spatial phase."),
                    io.Float.Input("debiased_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                                   tooltip="Weight of the appearance-debiased loss (what differs between frames)."),
                    io.Combo.Input("motion_alignment", options=list(MOTION_ALIGNMENT), default="features",
                                   optional=True,
                                   tooltip="How MoRA aligns with the clips' RAFT flow. features: a projector reads "
                                           "the flow off alignment_block's hidden states (fast, default). "
                                           "decoded_flow: the predicted clean video is decoded by the VAE with "
                                           "gradients and its RAFT flow compared (SMRABooth's code; needs vae and "
                                           "raft, and much more memory)."),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="For decoded_flow, and to decode previews: the VAE of the model you train."),
                    types.RaftModel.Input("raft", optional=True,
                                          tooltip="For decoded_flow: the flow network from Load RAFT."),
                    io.Int.Input("decode_window", default=6, min=1, max=64, optional=True,
                                 tooltip="For decoded_flow: latent frames decoded per step (the authors' 6)."),
                    _training_dtype_input(),
                    *memory_inputs(),
                    *noise_range_inputs(),
                    low_noise_model_input(),
                    *preview_inputs(vae=False)],
            outputs=[*_train_outputs(), *_low_noise_outputs()],
        )

    @classmethod
    def execute(cls, model, clips, steps, learning_rate, rank, roles, batch_size, alignment_weight,
                alignment_block, timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every,
                run_name, spatial_rank, debiased_weight, motion_alignment="features", vae=None, raft=None,
                decode_window=6, training_dtype="auto", recompute_every=1, offload_activations=False,
                blocks_to_swap=0, noise_range="all", expert_boundary=EXPERT_BOUNDARY["t2v"],
                model_low_noise=None, preview_every=0, preview_prompt="", clip=None) -> io.NodeOutput:
        decoded = motion_alignment == "decoded_flow" and alignment_weight > 0
        if decoded and buckets_of(clips)[0].flow is None:
            raise InputError("clips", "have no motion representation",
                             "clips encoded with a Motion Representation (RAFT flow), or motion_alignment 'features'")
        for name, value in (("vae", vae), ("raft", raft)) if decoded else ():
            if value is None:
                raise InputError(name, "is not connected", f"a {name.upper()} connected for motion_alignment "
                                                           "'decoded_flow', or 'features'")
        settings = MotionSettings(
            rank=rank, roles=_roles(roles), spatial_rank=spatial_rank, batch=batch_size,
            sigmas=SigmaSampler(timestep_sampling, shift),
            optim=OptimSettings(steps=steps, lr=learning_rate, seed=training_seed, checkpoint_every=checkpoint_every,
                                warmup=warmup_steps(steps), preview_every=preview_every),
            debiased_weight=debiased_weight, alignment_weight=alignment_weight, alignment_block=alignment_block,
            alignment=motion_alignment, gradient_checkpointing=gradient_checkpointing,
            memory=_memory(recompute_every, offload_activations, blocks_to_swap))

        def train_one(expert, sigmas, folder, log):
            with training_clone(expert) as (clone, backbone, device, to_model):
                flow_through = decoder_with_grad(vae, expert.model.process_latent_out, raft, decode_window) \
                    if decoded else None
                return train_motion(backbone, _data_in(to_model, clips), replace(settings, sigmas=sigmas), folder,
                                    training_progress(steps, "motion LoRA"), log, device=device,
                                    decoded_flow=flow_through, dtype=resolve_training_dtype(training_dtype, device),
                                    base_model=base_model_signature(expert),
                                    preview=previewer(clone, clips, preview_every, preview_prompt, clip, vae, steps))

        return _finish_experts(_train_experts(model, model_low_noise, noise_range, expert_boundary, run_name,
                                              settings.sigmas, train_one))


def _controlled_model(model, weights: DualRealWeights):
    """A clone of `model` on which every model call runs a joint run's subject and motion LoRAs weighed by its
    trained StageBlender controller (`weights`: `joint_dualreal`'s), from that call's tokens and timestep, per batch
    row and group of blocks."""
    return attached_per_call(model, dualreal_parts(weights, "joint"), "custvid_joint_controller")


class TrainJointLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_TrainJointLoRAs",
            display_name="Train Subject and Motion LoRAs Jointly",
            category=CATEGORY_TRAIN,
            description="Learns your subject and a motion as two LoRAs in one run (DualReal's dual-aware training): "
                        "each step learns the subject's photos (Train Subject LoRA's recipe) or the clips (Train "
                        "Motion LoRA's) while the other LoRA runs, frozen, so each learns beside the other it will "
                        "be used with. Optionally DualReal's StageBlender controller weighs the two per denoising "
                        "step and per group of blocks. The dualreal output keeps both LoRAs and the "
                        "controller for Save DualReal and Apply DualReal. The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan model from Load Diffusion Model (LoRAs may be applied)."),
                types.SubjectDataset.Input("subject", tooltip="From Subject Dataset: the subject steps learn it."),
                types.VideoDataset.Input("clips", tooltip="From Video Clips Dataset: the motion steps learn them."),
                io.Int.Input("steps", default=600, min=1, max=100000,
                             tooltip="Training steps in all (subject and motion steps together)."),
                _learning_rate_input(),
                io.Float.Input("motion_probability", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="Share of the steps that learn the clips (motion); the others learn the "
                                       "subject."),
                io.Boolean.Input("controller", default=False,
                                 tooltip="Also learn DualReal's StageBlender controller: per denoising step and group "
                                         "of blocks it multiplies the subject LoRA by 2w and the motion LoRA by 2 - 2w "
                                         "(both 1.0 at first), learning on every step. It acts in this node's model "
                                         "and dualreal outputs only (Save DualReal keeps it with the LoRAs): the "
                                         "saved LoRAs, loaded alone at 1.0, act as at its start. Off: both LoRAs "
                                         "at 1.0 throughout."),
                io.Int.Input("groups", default=0, min=0, max=64,
                             tooltip="With controller: groups of consecutive blocks weighed apart. 0: 7 (one per block "
                                     "on a model with fewer blocks). At most the model's block count."),
                io.Int.Input("subject_rank", default=32, min=1, max=256,
                             tooltip="Rank of the subject LoRA (on q, k and ffn.0, as Train Subject LoRA)."),
                io.Int.Input("motion_rank", default=64, min=1, max=256,
                             tooltip="Rank of the motion LoRA (on v, o and the FFN, as Train Motion LoRA)."),
                io.Int.Input("spatial_rank", default=32, min=0, max=256,
                             tooltip="Rank of the motion steps' throw-away spatial LoRA (q, k, ffn.0), off on "
                                     "subject steps; 0: no spatial phase."),
                io.Int.Input("stillness_rank", default=0, min=0, max=256,
                             tooltip="Rank of the subject steps' throw-away stillness LoRA (Still-Moving), as in "
                                     "Train Subject LoRA; needs preservation clips. 0: off."),
                _batch_input(),
                io.Float.Input("subject_alignment_weight", default=0.05, min=0.0, max=10.0, step=0.01,
                               tooltip="Weight of DINOv2 alignment (SuRA) on subject steps (needs the subject's "
                                       "representation in the dataset); 0 turns it off."),
                io.Float.Input("motion_alignment_weight", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Weight of RAFT alignment (MoRA, on features) on motion steps (needs the clips' "
                                       "representation in the dataset); 0 turns it off."),
                _alignment_block_input(),
                io.Float.Input("preservation_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the subject's preservation clips' loss (if its dataset has clips)."),
                io.Boolean.Input("region_loss", default=True,
                                 tooltip="On subject steps, count only the subject's region (needs masks)."),
                io.Int.Input("region_margin", default=0, min=0, max=16,
                             tooltip="Latent cells added around the mask for the region loss (Wan: 0; the shapes "
                                     "world: 3)."),
                io.Float.Input("moving_share", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="If the subject dataset has moving clips: the share of the photo steps that "
                                       "learn from them instead of the photos."),
                io.Float.Input("debiased_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the appearance-debiased loss on motion steps."),
                *noise_and_memory_inputs(),
                *_run_inputs("custvid_joint"),
                _training_dtype_input(),
                *memory_inputs(),
                *noise_range_inputs(),
                *preview_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model"), io.LoraModel.Output(display_name="subject_lora"),
                     io.LoraModel.Output(display_name="motion_lora"), io.Image.Output(display_name="loss_graph"),
                     types.DualReal.Output(display_name="dualreal")],
        )

    @classmethod
    def execute(cls, model, subject, clips, steps, learning_rate, motion_probability, controller, groups,
                subject_rank, motion_rank, spatial_rank, stillness_rank, batch_size, subject_alignment_weight,
                motion_alignment_weight, alignment_block, preservation_weight, region_loss, region_margin,
                moving_share, debiased_weight, timestep_sampling, shift, gradient_checkpointing, training_seed,
                checkpoint_every, run_name, training_dtype="auto", recompute_every=1, offload_activations=False,
                blocks_to_swap=0, noise_range="all", expert_boundary=EXPERT_BOUNDARY["t2v"], preview_every=0,
                preview_prompt="", clip=None, vae=None) -> io.NodeOutput:
        sigmas = noise_levels(timestep_sampling, shift, noise_range, expert_boundary)
        memory = _memory(recompute_every, offload_activations, blocks_to_swap)
        subject_settings = SubjectSettings(
            rank=subject_rank, batch=batch_size, sigmas=sigmas, region_loss=region_loss,
            preservation_weight=preservation_weight, alignment_weight=subject_alignment_weight,
            alignment_block=alignment_block, stillness_rank=stillness_rank, region_margin=region_margin,
            moving_share=moving_share, gradient_checkpointing=gradient_checkpointing, memory=memory)
        motion_settings = MotionSettings(
            rank=motion_rank, spatial_rank=spatial_rank, batch=batch_size, sigmas=sigmas,
            debiased_weight=debiased_weight, alignment_weight=motion_alignment_weight, alignment_block=alignment_block,
            gradient_checkpointing=gradient_checkpointing, memory=memory)
        optim = OptimSettings(steps=steps, lr=learning_rate, seed=training_seed, checkpoint_every=checkpoint_every,
                              warmup=warmup_steps(steps), preview_every=preview_every)
        folder = training_folder(run_name)
        notes, log = _run_log(run_name)
        with training_clone(model) as (clone, backbone, device, to_model):
            trained = train_joint(backbone, _data_in(to_model, subject), _data_in(to_model, clips), subject_settings,
                                  motion_settings, optim, motion_probability, folder,
                                  training_progress(steps, "subject and motion LoRAs"), log, device=device,
                                  dtype=resolve_training_dtype(training_dtype, device),
                                  base_model=base_model_signature(model),
                                  controller=JointController(groups or None) if controller else None,
                                  preview=previewer(clone, clips, preview_every, preview_prompt, clip, vae, steps))
        loras = [_lora_weights(model, trained[0], subject.trigger_words), _lora_weights(model, trained[1])]
        pair = joint_dualreal(trained, describe(model.model.diffusion_model))
        patched = _controlled_model(model, pair) if controller else None
        return _finish(model, trained[0], notes, pair, loras=loras, patched=patched, folders=(folder,))


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveLoRA",
            display_name="Save LoRA (to models/loras)",
            category=CATEGORY_TRAIN,
            description="Writes a trained LoRA to ComfyUI's models/loras folder, where Load LoRA finds it.",
            is_output_node=True,
            inputs=[io.LoraModel.Input("lora", tooltip="The lora output of a CustVid train node."),
                    io.String.Input("filename", default="custvid/my_subject",
                                    tooltip="Name under models/loras (sub-folders allowed); .safetensors is added."),
                    io.String.Input("trigger_words", default="sks",
                                    tooltip="Words the LoRA was trained with, stored in the file for reference. Empty: the "
                                            "trigger words of the Subject Dataset it was trained on."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace an existing file of the same name.")],
            outputs=[io.String.Output(display_name="lora_name")],
        )

    @classmethod
    def execute(cls, lora, filename, trigger_words, overwrite) -> io.NodeOutput:
        if not isinstance(lora, dict) or not native_lora_modules(lora):
            raise InputError("lora", "holds no Wan LoRA weights", "the lora output of a CustVid train node")
        root, path = safetensors_path("loras", filename, "filename", overwrite)
        save_lora(path, lora, trigger_words=" ".join(trigger_words.split()) or None)
        return io.NodeOutput(path.relative_to(root).as_posix())


NODES = [VideoDataset, SubjectDataset, TrainSubjectLoRA, TrainMotionLoRA, TrainJointLoRAs, SaveLoRA]
