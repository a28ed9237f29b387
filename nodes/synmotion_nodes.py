"""Nodes for SynMotion's motion customization: the subject prior clips the frozen model generates, the training of the
subject and motion embeddings with the motion LoRA, and the learned embeddings: applied to a prompt's conditioning,
saved to and loaded from models/custvid/synmotion."""

from __future__ import annotations

import dataclasses
import os

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..custvid_core.adapters.synmotion import (
    LearnedSynMotion,
    RolePositions,
    load_synmotion,
    save_synmotion,
    with_embeddings,
)
from ..custvid_core.errors import InputError
from ..custvid_core.training.datasets import single_size
from ..custvid_core.training.fingerprint import content_digest
from ..custvid_core.training.loop import warmup_steps
from ..custvid_core.training.objectives import EXPERT_BOUNDARY
from ..custvid_core.training.prior_clips import (
    PriorClips,
    PriorSettings,
    parse_prior_prompts,
    prior_clips,
    prompts_text,
    shipped_prior_prompts,
)
from ..custvid_core.training.synmotion import SynMotionSettings, prior_subject_positions, train_synmotion
from . import representation_nodes, schedule_nodes, types
from .host import (
    base_model_signature,
    model_files,
    prompt_tokens,
    resolve_training_dtype,
    safetensors_path,
    token_roles,
    training_backbone,
    training_folder,
    training_progress,
    word_tokens,
)
from .training_nodes import (
    _context,
    _data_in,
    _finish,
    _lora_weights,
    _memory,
    _run_log,
    _training_dtype_input,
    memory_inputs,
    noise_and_memory_inputs,
    noise_levels,
    noise_range_inputs,
)

CATEGORY_TRAIN = "CustVid/training"
# Under ComfyUI's output folder: generated clips are the user's output, and a rerun finds them there.
CACHE_FOLDER = "custvid_cache"
FOLDER = "custvid_synmotion"


def _conditioning(clip, prompts: list[str]) -> list:
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]


def _stacked_context(conditionings: list) -> torch.Tensor:
    """The prompts' conditioning rows `[P, L, D]`, the shorter padded with zero rows (as umt5 pads a prompt)."""
    rows = [c[0][0][0].float().cpu() for c in conditionings]
    length = max(r.shape[0] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])


class SubjectPriorClips(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SubjectPriorClips",
            display_name="Subject Prior Clips",
            category=CATEGORY_TRAIN,
            description="Clips your model itself generates, before any training, for ordinary subjects doing "
                        "ordinary things (SynMotion's subject prior videos): between motion steps the subject "
                        "embedding learns from them, so it stays a general subject and the motion stays in the "
                        "motion. Generated once and cached in output/custvid_cache; a rerun with the same model, "
                        "prompts and settings reads the cache.",
            inputs=[
                io.Model.Input("model", tooltip="The base model you will train the motion on, without the motion's "
                                                "LoRAs: the clips show what it makes on its own."),
                io.Clip.Input("clip", tooltip="Its text encoder; the prompts' conditioning is kept with the clips."),
                io.String.Input("prompts", multiline=True, default=prompts_text(shipped_prior_prompts()),
                                tooltip="One prompt per line as '<subject class> | <common action>', e.g. "
                                        "'a dog | walking' (the subject's words are where the subject embedding "
                                        "learns). Clip k uses line k, round the list again when there are more "
                                        "clips than lines."),
                io.Latent.Input("latent", tooltip="An empty video latent of the clips' size and length (e.g. Empty "
                                                  "Hunyuan Latent Video for Wan 2.1; its batch size is ignored)."),
                io.Int.Input("count", default=20, min=1, max=1000, tooltip="How many clips to generate."),
                # Picks the clips, generated once and cached: no control, or the frontend would add one set to randomize.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the first clip; clip k uses seed + k."),
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Sampling steps per clip."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Noise schedule."),
            ],
            outputs=[types.VideoDataset.Output(display_name="prior_clips")],
        )

    @classmethod
    def execute(cls, model, clip, prompts, latent, count, seed, steps, cfg, sampler_name, scheduler) -> io.NodeOutput:
        subjects = parse_prior_prompts(prompts)
        empty = comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1])
        if empty.ndim != 5:
            raise InputError("latent", f"a latent of shape {tuple(latent['samples'].shape)}",
                             "an empty video latent [batch, channels, frames, height, width]")
        positive = _conditioning(clip, [p.text for p in subjects])
        negative = _conditioning(clip, [""])[0]
        context = _stacked_context(positive)
        # The text encoder decides the conditioning kept with the clips: a cache made with another one is not reused.
        settings = PriorSettings(count, seed, empty.shape[-1], empty.shape[-2], empty.shape[2], steps, cfg,
                                 (("sampler", sampler_name), ("scheduler", scheduler), ("latent", tuple(empty.shape)),
                                  ("text", content_digest(context))))
        bar = comfy.utils.ProgressBar(count * steps)
        done = {"clips": 0}

        def generate(index: int, clip_seed: int) -> torch.Tensor:
            noise = comfy.sample.prepare_noise(empty, clip_seed)
            first = done["clips"] * steps

            def step(i, *_):  # ComfyUI's interrupt is raised from here
                bar.update_absolute(first + i + 1)

            return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive[index], negative,
                                       empty, callback=step, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                       seed=clip_seed)

        def progress(clips_done: int, total: int) -> None:
            done["clips"] = clips_done
            bar.update_absolute(clips_done * steps, total * steps)

        cache = os.path.join(folder_paths.get_output_directory(), CACHE_FOLDER)
        # Loaded first: ComfyUI unpatches a model lazily, so its weights may still hold the LoRAs of the last prompt.
        comfy.model_management.load_models_gpu([model])
        clips = prior_clips(generate, subjects, lambda _: context, settings, base_model_signature(model), cache,
                            progress)
        comfy.model_management.soft_empty_cache()
        return io.NodeOutput(clips)


def _captions(prompt: str, subject_words: str) -> list[tuple[str, str]]:
    """The clips' captions (one per line) with each one's subject words: the only ones given, or, for several
    captions, the comma-separated entry found in that caption (the first there, where several are)."""
    captions = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not captions:
        raise InputError("prompt", "it is empty", "the clips' caption, with the subject and motion words in it")
    if len(captions) == 1:
        return [(captions[0], " ".join(subject_words.split()))]
    entries = [" ".join(e.split()) for e in subject_words.split(",") if e.strip()]
    paired = []
    for caption in captions:
        words = f" {' '.join(caption.split())} "
        found = sorted((e for e in entries if f" {e} " in words), key=words.index)
        if not found:
            raise InputError("subject_words", f"none of '{subject_words}' is in the caption '{caption}'",
                             "each caption's subject words, separated by commas (e.g. 'a dog, a cat')")
        paired.append((caption, found[0]))
    return paired


def _clip_positions(clip, captions: list[tuple[str, str]], motion_words: str, clips) -> list[RolePositions]:
    """Where the subject and motion words sit in each clip's caption: each clip is matched to the caption that encodes
    to its conditioning, so a caption that is not the clip's is refused rather than trained at wrong rows."""
    encoded = torch.cat([_context(c, "prompt") for c in _conditioning(clip, [text for text, _ in captions])])
    if encoded.shape[1:] != clips.context.shape[1:]:
        raise InputError("prompt", f"it encodes to conditioning of shape {tuple(encoded.shape[1:])}",
                         f"the caption the clips were encoded with ({tuple(clips.context.shape[1:])}), by this clip")
    positions = {}
    each = []
    for k, context in enumerate(clips.context):
        scale = float(context.abs().max().clamp_min(1e-6))
        match = next((i for i, e in enumerate(encoded) if torch.allclose(e, context, rtol=1e-2, atol=1e-2 * scale)),
                     None)
        if match is None:
            raise InputError("prompt", f"clip {k + 1}'s conditioning is not the encoding of "
                             f"{'its caption' if len(captions) == 1 else 'any of its lines'}",
                             "the clips' caption exactly as encoded (one line per caption where the clips' differ), "
                             "encoded by the text encoder connected to clip")
        if match not in positions:
            caption, subject = captions[match]
            positions[match] = RolePositions(token_roles(caption, subject, clip).subject,
                                             token_roles(caption, motion_words, clip, words_input="motion_words").subject)
        each.append(positions[match])
    return each


class TrainSynMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_TrainSynMotion",
            display_name="Train SynMotion",
            category=CATEGORY_TRAIN,
            description="Learns the motion of your clips as SynMotion does: a subject and a motion embedding added to "
                        "the caption's subject and motion words (with a refiner), and a motion LoRA on q, k, v of every "
                        "attention layer. With prior clips, a quarter of the steps teach the subject embedding on them "
                        "alone, so the subject stays in it and the motion in the motion's parts. Use the motion LoRA "
                        "and Apply SynMotion Embeddings to give the motion to a new subject. The input MODEL is not "
                        "changed.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan model from Load Diffusion Model (LoRAs may be applied); the "
                                                "same one Subject Prior Clips generated with."),
                types.VideoDataset.Input("clips", tooltip="From Video Clips Dataset: clips of the motion, each "
                                                          "encoded with the caption given in prompt."),
                io.Clip.Input("clip", tooltip="The text encoder that encoded the clips' caption; its tokenizer finds "
                                              "the subject and motion words in it."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The clips' caption exactly as encoded, holding the subject's and the "
                                        "motion's words, e.g. 'a dog moving left'. Clips captioned differently: each "
                                        "caption on a line of its own (in any order). A clip whose conditioning is not "
                                        "one of these captions' encoding is refused."),
                io.String.Input("subject_words", default="",
                                tooltip="The clips' subject words as they appear in the prompt, e.g. 'a dog'. With "
                                        "several captions, each one's, separated by commas, e.g. 'a dog, a cat'."),
                io.String.Input("motion_words", default="",
                                tooltip="The motion words as they appear in the prompt, e.g. 'moving left'. Apply "
                                        "SynMotion Embeddings edits these words' rows: write them the same way there."),
                types.VideoDataset.Input("prior_clips", optional=True,
                                         tooltip="From Subject Prior Clips, generated by this MODEL. Not connected: "
                                                 "every step learns the clips (no prior steps)."),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Training steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-6,
                               tooltip="AdamW learning rate of the embeddings and the LoRA after warm-up; cosine "
                                       "decay to a tenth of it."),
                io.Int.Input("rank", default=64, min=1, max=256, tooltip="The motion LoRA's rank."),
                io.Boolean.Input("refiner", default=True,
                                 tooltip="Learn the refiner that adapts the embeddings to each prompt's words. Off: "
                                         "the embeddings are added as they are."),
                *noise_and_memory_inputs(),
                io.Int.Input("training_seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed for noise, clips, step kinds and the initialisation (fixed, so a rerun "
                                     "resumes)."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=100000,
                             tooltip="Write a checkpoint every N steps; a rerun with the same run_name resumes."),
                io.String.Input("run_name", default="custvid_synmotion",
                                tooltip="Folder under output/custvid_training/ for this run's checkpoint. A rerun with "
                                        "the same data, settings and model resumes it; another run trains afresh."),
                _training_dtype_input(),
                *memory_inputs(),
                *noise_range_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model"), io.LoraModel.Output(display_name="lora"),
                     io.Image.Output(display_name="loss_graph"),
                     types.SynMotionEmbeddings.Output(display_name="synmotion_embeddings")],
        )

    @classmethod
    def execute(cls, model, clips, clip, prompt, subject_words, motion_words, steps, learning_rate, rank, refiner,
                timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every, run_name,
                prior_clips=None, training_dtype="auto", recompute_every=1, offload_activations=False,
                blocks_to_swap=0, noise_range="all", expert_boundary=EXPERT_BOUNDARY["t2v"]) -> io.NodeOutput:
        motion_words = " ".join(motion_words.split())
        captions = _captions(prompt, subject_words)
        clips = single_size(clips, "clips")  # SynMotion learns from clips of one size
        positions = _clip_positions(clip, captions, motion_words, clips)
        subject_words = ", ".join(dict.fromkeys(subject for _, subject in captions))
        motion_phrase = _context(_conditioning(clip, [motion_words])[0], "motion_words")
        prior_subjects = None
        if prior_clips is not None:
            if not isinstance(prior_clips, PriorClips):
                raise InputError("prior_clips", "are not subject prior clips", "the output of Subject Prior Clips")
            prior_subjects = prior_subject_positions(
                prior_clips, lambda p: token_roles(p.text, p.subject, clip, words_input="prior_clips").subject)
        defaults = SynMotionSettings()
        settings = dataclasses.replace(
            defaults, rank=rank, prior=prior_clips is not None, refiner=refiner,
            sigmas=noise_levels(timestep_sampling, shift, noise_range, expert_boundary),
            gradient_checkpointing=gradient_checkpointing,
            memory=_memory(recompute_every, offload_activations, blocks_to_swap),
            optim=dataclasses.replace(defaults.optim, steps=steps, lr=learning_rate, seed=training_seed,
                                      checkpoint_every=checkpoint_every, warmup=warmup_steps(steps)))
        folder = training_folder(run_name)
        notes, log = _run_log(run_name)
        with training_backbone(model) as (backbone, device, to_model):
            base_model = base_model_signature(model)
            prior = None if prior_clips is None else _data_in(to_model, prior_clips)
            trained = train_synmotion(backbone, _data_in(to_model, clips), positions, motion_phrase, prior, settings,
                                      prior_subjects, base_model, subject_words, motion_words, folder,
                                      training_progress(steps, "SynMotion"), log, device=device,
                                      dtype=resolve_training_dtype(training_dtype, device), base_model=base_model)
        learned = LearnedSynMotion.from_exported(trained.parts[settings.name])
        return _finish(model, trained, notes, learned, loras=[_lora_weights(model, trained, motion_words)])


def _require_trained_tokens(clip, prompt: str, motion_words: str, motion: tuple[int, ...],
                            learned: LearnedSynMotion) -> None:
    """Refuse motion rows whose tokens are not the trained words' tokens in their order: each learned row belongs to
    one token of the words as training found them."""
    if not learned.motion_words:  # embeddings saved without their words: nothing to compare with
        return
    trained = [t for tokens in word_tokens(clip, learned.motion_words, "motion_words").values() for t in tokens]
    ids = prompt_tokens(clip, prompt)
    if [ids[i] for i in motion] != trained:
        raise InputError("motion_words", f"'{motion_words}' tokenizes in this prompt to other tokens than the words "
                         f"it was trained at ('{learned.motion_words}'), or to the same in another order",
                         "the motion words written as in training, in the same order: each learned row belongs to "
                         "one of their tokens")


class ApplySynMotionEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_ApplySynMotionEmbeddings",
            display_name="Apply SynMotion Embeddings",
            category=schedule_nodes.CATEGORY,
            description="Edits a prompt's conditioning where its motion words sit with the learned motion embedding "
                        "and its refiner (and, with `subject` on, where its subject words sit with the learned subject "
                        "embedding), as in training. Give a prompt with a new subject doing the learned motion. The "
                        "conditioning is edited once, before sampling: sampling costs the same as without. The input "
                        "conditioning is not changed. The motion embedding holds one learned row per token of the "
                        "motion words as the text encoder's tokenizer split them in training, so the prompt must "
                        "hold those words as written there. Where they tokenize otherwise (another count of tokens; "
                        "other tokens: other words, another spelling or capitalisation, a word glued to punctuation "
                        "that the tokenizer splits another way; or another order) the node refuses, naming "
                        "motion_words, rather than add the rows to tokens they were not learned on. The subject "
                        "words may be any: the subject embedding is one row, added to each of their tokens.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive prompt, encoded by your text encoder."),
                types.SynMotionEmbeddings.Input("synmotion_embeddings", tooltip="From Load SynMotion Embeddings."),
                io.Clip.Input("clip", tooltip="The text encoder that encoded the prompt; its tokenizer finds the "
                                              "motion and subject words in it."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt exactly as encoded into conditioning."),
                io.String.Input("motion_words", default="",
                                tooltip="The motion words as they appear in the prompt, written as in training (e.g. "
                                        "'moving left'). Empty: the words it was trained at. The motion embedding "
                                        "has one row per token of those words, so words that tokenize otherwise "
                                        "than in training (another count, other tokens, another order) are refused "
                                        "rather than put on tokens the rows were not learned on."),
                io.String.Input("subject_words", default="",
                                tooltip="The subject words as they appear in the prompt (used with `subject` on). "
                                        "Empty: the words it was trained at."),
                io.Boolean.Input("subject", default=False,
                                 tooltip="Also add the learned subject embedding at the subject words: only to "
                                         "regenerate the training clips' own subject. Off for a new subject, which "
                                         "must not take on what it learned of the clips' subject."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Multiplies the edit; 0 leaves the conditioning as it is."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, conditioning, synmotion_embeddings, clip, prompt, motion_words="", subject_words="",
                subject=False, strength=1.0) -> io.NodeOutput:
        learned = synmotion_embeddings
        if not prompt.strip():
            raise InputError("prompt", "it is empty", "the prompt exactly as encoded into conditioning")
        motion_words = " ".join(motion_words.split()) or learned.motion_words
        motion = token_roles(prompt, motion_words, clip, words_input="motion_words").subject
        rows = learned.motion_residual.shape[0]
        if len(motion) != rows:
            raise InputError("motion_words", f"'{motion_words}' is {len(motion)} tokens in this prompt",
                             f"the words it was trained at ('{learned.motion_words}', {rows} tokens): the motion "
                             "embedding has one row per token")
        _require_trained_tokens(clip, prompt, motion_words, motion, learned)
        subject_rows = ()
        if subject:
            words = " ".join(subject_words.split()) or learned.subject_words
            subject_rows = token_roles(prompt, words, clip, words_input="subject_words").subject
        positions = RolePositions(subject_rows, motion)
        out = []
        for context, extras in conditioning:
            if max(positions.motion + positions.subject) >= context.shape[1]:
                raise InputError("prompt", f"its words sit past the conditioning's {context.shape[1]} rows",
                                 "the prompt that was encoded into conditioning")
            out.append([with_embeddings(context, positions, learned, subject, strength), dict(extras)])
        return io.NodeOutput(out)


class SaveSynMotionEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveSynMotionEmbeddings",
            display_name="Save SynMotion Embeddings",
            category=CATEGORY_TRAIN,
            description="Writes learned SynMotion embeddings (the subject and motion embeddings, the refiner and the "
                        "words they were learned at) to models/custvid/synmotion. Keep them with the motion LoRA "
                        "they were trained with.",
            is_output_node=True,
            inputs=[types.SynMotionEmbeddings.Input("synmotion_embeddings", tooltip="The learned embeddings."),
                    io.String.Input("filename", default="custvid/my_motion",
                                    tooltip="Name under models/custvid/synmotion (sub-folders allowed); .safetensors "
                                            "is added. Naming it as its LoRA keeps the pair together."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name.")],
            outputs=[io.String.Output(display_name="synmotion_embeddings_name")],
        )

    @classmethod
    def execute(cls, synmotion_embeddings, filename, overwrite) -> io.NodeOutput:
        root, path = safetensors_path(FOLDER, filename, "filename", overwrite)
        save_synmotion(path, synmotion_embeddings)
        return io.NodeOutput(path.relative_to(root).as_posix())


class LoadSynMotionEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadSynMotionEmbeddings",
            display_name="Load SynMotion Embeddings",
            category=representation_nodes.CATEGORY_LOADERS,
            description="Loads SynMotion embeddings saved by Save SynMotion Embeddings.",
            inputs=[io.Combo.Input("synmotion_embeddings_name", options=model_files(FOLDER),
                                   tooltip="A file in models/custvid/synmotion.")],
            outputs=[types.SynMotionEmbeddings.Output(display_name="synmotion_embeddings")],
        )

    @classmethod
    def execute(cls, synmotion_embeddings_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, synmotion_embeddings_name)
        return io.NodeOutput(load_synmotion(path, input_name="synmotion_embeddings_name"))


NODES = [SubjectPriorClips, TrainSynMotion, ApplySynMotionEmbeddings, SaveSynMotionEmbeddings, LoadSynMotionEmbeddings]
