"""Nodes that learn a subject and a motion as LoRAs on the user's own Wan model (SMRABooth's recipe
with MotionBooth's subject losses), and save them where ComfyUI's LoRA loaders find them."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from comfy_api.latest import io, ui

from ..custvid_core.adapters.embedding import LearnedTrigger
from ..custvid_core.adapters.lora import MOTION_ROLES, SUBJECT_ROLES, native_lora_modules
from ..custvid_core.errors import InputError
from ..custvid_core.files import save_safetensors
from ..custvid_core.images import as_image_list, as_mask_list, hue_rotations, moving_photos
from ..custvid_core.media import loss_plot
from ..custvid_core.training import (
    MotionSettings,
    OptimSettings,
    SigmaSampler,
    SubjectSet,
    SubjectSettings,
    VideoSet,
    train_motion,
    train_subject,
)
from ..custvid_core.training.customize import MOTION_ALIGNMENT
from ..custvid_core.training.objectives import SIGMA_SAMPLING, latent_mask
from . import types
from .host import (
    TRAINING_DTYPES,
    base_model_signature,
    decoder_with_grad,
    plain,
    progress_callback,
    resolve_training_dtype,
    safetensors_path,
    show_on_node,
    token_roles,
    training_backbone,
    training_folder,
    training_progress,
)

CATEGORY_DATA = "CustVid/training data"
CATEGORY_TRAIN = "CustVid/training"


def _context(conditioning, input_name: str) -> torch.Tensor:
    if not conditioning or not isinstance(conditioning[0][0], torch.Tensor):
        raise InputError(input_name, "is empty", "the output of a text encode node (CONDITIONING)")
    return conditioning[0][0].float().cpu()


def _encode_clip(vae, frames: torch.Tensor) -> torch.Tensor:
    return vae.encode(frames[..., :3]).float().cpu()


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
            ],
            outputs=[types.VideoDataset.Output(display_name="clips")],
        )

    @classmethod
    def execute(cls, vae, frames, conditioning, motion_representation=None, add_to=None,
                hue_copies=0) -> io.NodeOutput:
        if frames.shape[0] < 2:
            raise InputError("frames", f"{frames.shape[0]} frame", "a clip of at least 2 frames (5 or more on Wan)")
        versions = hue_rotations(frames[..., :3], hue_copies)
        latents = torch.cat([_encode_clip(vae, v) for v in versions])
        # Single frames as photos for the motion recipe's spatial LoRA (up to 8, evenly spaced).
        picks = torch.linspace(0, frames.shape[0] - 1, min(8, frames.shape[0])).round().long().tolist()
        stills = torch.stack([torch.cat([_encode_clip(vae, v[i:i + 1]) for i in picks]) for v in versions])
        context = _context(conditioning, "conditioning")
        flow = None
        if motion_representation is not None:
            flow = motion_representation.flow
            if flow.shape[0] != frames.shape[0] - 1:
                raise InputError("motion_representation", f"flow of {flow.shape[0] + 1} frames",
                                 f"the representation of this clip ({frames.shape[0]} frames)")
            flow = flow[None].float().expand(len(versions), *flow.shape)
        if add_to is not None:
            if add_to.latents.shape[1:] != latents.shape[1:]:
                raise InputError("frames", f"latents {tuple(latents.shape[1:])} differ from the earlier clips' "
                                 f"{tuple(add_to.latents.shape[1:])}", "clips of the same frame count and size")
            if (add_to.flow is None) != (flow is None):
                raise InputError("motion_representation", "given for some clips and not others",
                                 "a motion representation for every clip, or for none")
            if add_to.stills.shape[1] != stills.shape[1]:
                raise InputError("frames", f"{frames.shape[0]} frames after clips of another length",
                                 "clips of the same frame count and size")
            context = _append_context(add_to.context, add_to.latents.shape[0], context, latents.shape[0], "clips")
            latents = torch.cat([add_to.latents, latents])
            flow = torch.cat([add_to.flow, flow]) if flow is not None else None
            stills = torch.cat([add_to.stills, stills])
        return io.NodeOutput(VideoSet(latents, context, flow, stills))


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
            ],
            outputs=[types.SubjectDataset.Output(display_name="subject")],
        )

    @classmethod
    def execute(cls, vae, images, conditioning, masks=None, subject_representation=None,
                preservation=None, add_to=None, prompt="", trigger_words="", clip=None,
                world_text=None, moving_clips=0, moving_frames=17, moving_travel=0.3) -> io.NodeOutput:
        photos = as_image_list(images, "images")
        latents = torch.cat([_encode_clip(vae, p[None]) for p in photos])
        grid_masks = mask_list = None
        if masks is not None:
            mask_list = as_mask_list(masks, photos, "masks")
            grid_masks = latent_mask(torch.stack(mask_list)[:, None], latents.shape)
        context = _context(conditioning, "conditioning")
        moving = _moving_clips(vae, photos, mask_list, context, moving_clips, moving_frames, moving_travel) \
            if moving_clips else None
        tokens = None
        if subject_representation is not None:
            if subject_representation.patch_tokens.shape[0] != len(photos):
                raise InputError("subject_representation",
                                 f"features of {subject_representation.patch_tokens.shape[0]} images",
                                 f"the representation of these {len(photos)} photos")
            tokens = subject_representation.patch_tokens.permute(0, 3, 1, 2).float().contiguous()
        subject_tokens = None
        words = " ".join(trigger_words.split())
        if words:
            subject_tokens = token_roles(prompt, words, clip or world_text, words_input="trigger_words").subject
        photo_set = SubjectSet(latents, context, grid_masks, tokens, preservation, subject_tokens, words, moving)
        return io.NodeOutput(photo_set if add_to is None else _append_photos(add_to, photo_set))


def _moving_clips(vae, photos, masks, context, per_photo: int, frames: int, travel: float) -> SubjectSet:
    """The photos' subjects sliding over their backgrounds, encoded as clips with their masks."""
    if masks is None:
        raise InputError("moving_clips", "the subject is cut out by its mask, and no masks were given",
                         "masks for the photos, or 0")
    step = vae.temporal_compression_decode() or 1
    if frames % step not in (0, 1 % step):
        raise InputError("moving_frames", f"{frames} frames",
                         f"a count this VAE encodes whole: 1 + {step}k or {step}k (Wan: 17, 33, ...)")
    clips, clip_masks = moving_photos(photos, masks, per_photo, frames, (0.75 * travel, travel))
    progress = progress_callback(len(clips))
    encoded = []
    for i, c in enumerate(clips):
        encoded.append(_encode_clip(vae, c))
        progress(i + 1, len(clips))
    latents = torch.cat(encoded)
    return SubjectSet(latents, context, latent_mask(clip_masks, latents.shape))


def _append_context(earlier: torch.Tensor, n_old: int, context: torch.Tensor, n_new: int, what: str) -> torch.Tensor:
    """One conditioning row per item of a chained dataset (a single row stands for all of its items)."""
    if earlier.shape[1:] != context.shape[1:]:
        raise InputError("conditioning", f"its shape differs from the earlier {what}'",
                         "prompts from the same text encoder")
    return torch.cat([earlier.expand(n_old, -1, -1), context.expand(n_new, -1, -1)])


def _append_photos(earlier: SubjectSet, new: SubjectSet) -> SubjectSet:
    n_old, n_new = earlier.latents.shape[0], new.latents.shape[0]
    if earlier.latents.shape[1:] != new.latents.shape[1:]:
        raise InputError("images", f"photos of latent size {tuple(new.latents.shape[-2:])} after photos of "
                         f"{tuple(earlier.latents.shape[-2:])}", "photos of the same size in one dataset")
    if (earlier.masks is None) != (new.masks is None) or (earlier.dino_tokens is None) != (new.dino_tokens is None):
        raise InputError("masks", "given for some photos and not others",
                         "masks (and subject representations) for every photo, or for none")
    moving = earlier.moving or new.moving
    if earlier.moving is not None and new.moving is not None:
        if earlier.moving.latents.shape[1:] != new.moving.latents.shape[1:]:
            raise InputError("moving_frames", "moving clips of another length or size than the earlier photos'",
                             "the same moving_frames and photo size in one dataset")
        moving = _append_photos(earlier.moving, new.moving)  # clips with masks, appended as photos are
    return SubjectSet(torch.cat([earlier.latents, new.latents]),
                      _append_context(earlier.context, n_old, new.context, n_new, "photos"),
                      torch.cat([earlier.masks, new.masks]) if new.masks is not None else None,
                      torch.cat([earlier.dino_tokens, new.dino_tokens]) if new.dino_tokens is not None else None,
                      new.preservation or earlier.preservation, new.subject_tokens or earlier.subject_tokens,
                      new.trigger_words if new.subject_tokens else earlier.trigger_words, moving)


def _common_inputs(default_rank: int, default_alignment: float, roles: tuple[str, ...]) -> list:
    return [
        io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Training steps (batches)."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-6,
                       tooltip="AdamW learning rate after warm-up; cosine decay to a tenth of it."),
        io.Int.Input("rank", default=default_rank, min=1, max=256, tooltip="LoRA rank."),
        io.String.Input("roles", default=", ".join(roles),
                        tooltip="Which linear layers of every block get the LoRA, comma-separated: "
                                "self_attn.q/k/v/o, cross_attn.q/k/v/o, ffn.0, ffn.2."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Items per step."),
        io.Float.Input("alignment_weight", default=default_alignment, min=0.0, max=10.0, step=0.01,
                       tooltip="Weight of the representation alignment loss (needs representations in the "
                               "dataset); 0 turns it off."),
        io.Int.Input("alignment_block", default=3, min=0, max=63,
                     tooltip="The block whose hidden states are aligned (SMRABooth: block 3)."),
        io.Combo.Input("timestep_sampling", options=list(SIGMA_SAMPLING), default="logit_normal",
                       tooltip="How noise levels are drawn for training."),
        io.Float.Input("shift", default=1.0, min=0.1, max=20.0, step=0.1,
                       tooltip="Shift of the drawn noise levels (higher: more training at high noise)."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in the backward pass: much less memory, ~30% slower."),
        io.Int.Input("training_seed", default=0, min=0, max=2 ** 31 - 1,
                     tooltip="Seed for noise, batches and LoRA initialisation (fixed, so a rerun resumes)."),
        io.Int.Input("checkpoint_every", default=100, min=1, max=100000,
                     tooltip="Write a checkpoint every N steps; a rerun with the same run_name resumes."),
        io.String.Input("run_name", default="custvid_run",
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


def _finish(model, trained, notes: list[str], *more) -> io.NodeOutput:
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, trained.tensors, 1.0, 0)
    text = "\n".join(notes or [f"trained {len(trained.history)} steps"])
    show_on_node(text)
    return io.NodeOutput(patched, trained.tensors, loss_plot(trained.history), *more, ui=ui.PreviewText(text))


def _latents_in(to_model, latents: torch.Tensor) -> torch.Tensor:
    return plain(to_model(latents))


def _clips_in(to_model, clips: VideoSet) -> VideoSet:
    """A clips dataset as the model takes it (latents and stills in the model's own latent format)."""
    stills = clips.stills
    return VideoSet(_latents_in(to_model, clips.latents), plain(clips.context), plain(clips.flow),
                    _latents_in(to_model, stills.flatten(0, 1)).view(stills.shape) if stills is not None else None)


def _subject_in(to_model, subject: SubjectSet) -> SubjectSet:
    """A subject dataset as the model takes it (its photos, moving clips and preservation clips)."""
    clips, moving = subject.preservation, subject.moving
    return SubjectSet(_latents_in(to_model, subject.latents), plain(subject.context), plain(subject.masks),
                      plain(subject.dino_tokens), _clips_in(to_model, clips) if clips else None,
                      subject.subject_tokens, subject.trigger_words,
                      _subject_in(to_model, moving) if moving is not None else None)


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
                    _training_dtype_input()],
            outputs=[*_train_outputs(), types.TriggerEmbedding.Output(display_name="trigger_embedding")],
        )

    @classmethod
    def execute(cls, model, subject, steps, learning_rate, rank, roles, batch_size, alignment_weight,
                alignment_block, timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every,
                run_name, preservation_weight, region_loss, stillness_rank=0, region_margin=0,
                trigger_embedding=False, moving_share=0.5, training_dtype="auto") -> io.NodeOutput:
        settings = SubjectSettings(
            rank=rank, roles=_roles(roles), batch=batch_size, sigmas=SigmaSampler(timestep_sampling, shift),
            optim=OptimSettings(steps=steps, lr=learning_rate, seed=training_seed, checkpoint_every=checkpoint_every,
                                warmup=min(20, steps // 10)),
            region_loss=region_loss, preservation_weight=preservation_weight, alignment_weight=alignment_weight,
            alignment_block=alignment_block, gradient_checkpointing=gradient_checkpointing,
            stillness_rank=stillness_rank, region_margin=region_margin, trigger_embedding=trigger_embedding,
            moving_share=moving_share)
        folder = training_folder(run_name)
        notes, log = _run_log(run_name)
        with training_backbone(model) as (backbone, device, to_model):
            data = _subject_in(to_model, subject)
            trained = train_subject(backbone, data, settings, folder, training_progress(steps, "subject LoRA"),
                                    log, device=device, dtype=resolve_training_dtype(training_dtype, device),
                                    base_model=base_model_signature(model))
        learned = None if trained.trigger_embedding is None else \
            LearnedTrigger(trained.trigger_embedding, subject.trigger_words)
        return _finish(model, trained, notes, learned)


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
                                 tooltip="For decoded_flow: the VAE of the model you train."),
                    types.RaftModel.Input("raft", optional=True,
                                          tooltip="For decoded_flow: the flow network from Load RAFT."),
                    io.Int.Input("decode_window", default=6, min=1, max=64, optional=True,
                                 tooltip="For decoded_flow: latent frames decoded per step (the authors' 6)."),
                    _training_dtype_input()],
            outputs=_train_outputs(),
        )

    @classmethod
    def execute(cls, model, clips, steps, learning_rate, rank, roles, batch_size, alignment_weight,
                alignment_block, timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every,
                run_name, spatial_rank, debiased_weight, motion_alignment="features", vae=None, raft=None,
                decode_window=6, training_dtype="auto") -> io.NodeOutput:
        decoded = motion_alignment == "decoded_flow" and alignment_weight > 0
        if decoded and clips.flow is None:
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
                                warmup=min(20, steps // 10)),
            debiased_weight=debiased_weight, alignment_weight=alignment_weight, alignment_block=alignment_block,
            alignment=motion_alignment, gradient_checkpointing=gradient_checkpointing)
        folder = training_folder(run_name)
        notes, log = _run_log(run_name)
        with training_backbone(model) as (backbone, device, to_model):
            data = _clips_in(to_model, clips)
            flow_through = decoder_with_grad(vae, model.model.process_latent_out, raft, decode_window) \
                if decoded else None
            trained = train_motion(backbone, data, settings, folder, training_progress(steps, "motion LoRA"),
                                   log, device=device, decoded_flow=flow_through,
                                   dtype=resolve_training_dtype(training_dtype, device),
                                   base_model=base_model_signature(model))
        return _finish(model, trained, notes)


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
                                    tooltip="Words the LoRA was trained with, stored in the file for reference."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace an existing file of the same name.")],
            outputs=[io.String.Output(display_name="lora_name")],
        )

    @classmethod
    def execute(cls, lora, filename, trigger_words, overwrite) -> io.NodeOutput:
        if not isinstance(lora, dict) or not native_lora_modules(lora):
            raise InputError("lora", "holds no Wan LoRA weights", "the lora output of a CustVid train node")
        root, path = safetensors_path("loras", filename, "filename", overwrite)
        ranks = sorted({int(v.shape[0]) for k, v in lora.items() if k.endswith(".lora_down.weight")})
        roles = sorted({m.split(".", 2)[2] for m in native_lora_modules(lora)})
        save_safetensors(path, lora, {"custvid.lora.info": {"trigger_words": trigger_words, "ranks": ranks,
                                                            "roles": roles}})
        return io.NodeOutput(path.relative_to(root).as_posix())


NODES = [VideoDataset, SubjectDataset, TrainSubjectLoRA, TrainMotionLoRA, SaveLoRA]
