"""DualReal in ComfyUI: identity and motion adapters trained jointly with the StageBlender controller that weighs
them per denoising step and per group of blocks; applied to a MODEL clone, saved to models/custvid/dualreal, and
the controller's weights drawn over the steps of a prompt."""

from __future__ import annotations

import dataclasses

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..custvid_core.adapters.dualreal import RESIDUALS, DualRealWeights, check_base_model, load_dualreal, save_dualreal
from ..custvid_core.adapters.stage_blender import WEIGHTINGS, block_groups, dualreal_parts, weights_over_steps
from ..custvid_core.backbones import describe
from ..custvid_core.errors import InputError
from ..custvid_core.media import loss_plot, series_plot
from ..custvid_core.training.dualreal import DualRealSettings, ImageEmbeddings, dualreal_weights, train_dualreal
from ..custvid_core.training.objectives import EXPERT_BOUNDARY
from . import types
from .host import (
    attached_per_call,
    base_model_signature,
    model_files,
    plain,
    progress_callback,
    resolve_training_dtype,
    safetensors_path,
    show_on_node,
    training_backbone,
    training_folder,
    training_progress,
)
from .training_nodes import (
    _context,
    _data_in,
    _run_log,
    _training_dtype_input,
    noise_and_memory_inputs,
    noise_levels,
    noise_range_inputs,
)

CATEGORY = "CustVid/DualReal"
FOLDER = "custvid_dualreal"
AUTHORS_WARMUP_SHARE = 5  # the authors warm up for 200 of their 1000 steps


def _image_embeddings(output, input_name: str) -> torch.Tensor | None:
    """A CLIP_VISION_OUTPUT's image embeddings `[N, D]` (one per image encoded), usable by autograd."""
    if output is None:
        return None
    embeds = getattr(output, "image_embeds", None)
    if not torch.is_tensor(embeds) or embeds.ndim != 2:
        raise InputError(input_name, "holds no image embedding", "the output of CLIP Vision Encode")
    return plain(embeds.detach().float().cpu())


def _reference(weights: DualRealWeights, clip_vision_output, input_name: str = "clip_vision_output"
               ) -> torch.Tensor | None:
    """The motion adapters' condition at sampling time: the reference image's embedding `[1, D]` (the mean of
    several images), refused where the adapters were trained without one or with another width."""
    width = weights.condition_dim
    embeds = _image_embeddings(clip_vision_output, input_name)
    if embeds is None:
        if width:
            raise InputError(input_name, f"is not connected, and this DualReal was trained with image embeddings "
                             f"(width {width})", "CLIP Vision Encode of the subject's reference image")
        return None
    if not width:
        raise InputError(input_name, "is connected, and this DualReal was trained without image embeddings",
                         "nothing connected")
    if embeds.shape[1] != width:
        raise InputError(input_name, f"embeddings of width {embeds.shape[1]}",
                         f"width {width}: the CLIP vision model the DualReal was trained with")
    return embeds.mean(dim=0, keepdim=True)


def _fits(model, weights: DualRealWeights, input_name: str):
    """The model's Wan description, once `weights` are found to fit it (else refused, naming `input_name`)."""
    if not isinstance(weights, DualRealWeights):
        raise InputError(input_name, "is not a DualReal", "the output of Train DualReal or Load DualReal")
    backbone = describe(model.model.diffusion_model)
    for exported in weights.parts.values():
        check_base_model(exported.metadata["base_model"], backbone, input_name)
    return backbone


def dualreal_model(model, weights: DualRealWeights, reference: torch.Tensor | None, strength: float,
                   input_name: str = "dualreal"):
    """A clone of `model` on which every call of the diffusion model runs with the identity and motion parts (adapters,
    or a joint run's two LoRAs) and the controller attached (the controller weighs them from that call's tokens and
    timestep; without one, adapters run at their fixed weight and LoRAs at 1.0, each times `strength`); the input
    MODEL is not changed. `weights`: ones that fit the model (`_fits`)."""
    parts = dualreal_parts(weights, input_name=input_name)
    identity, motion = parts[:2]

    def on_enter():  # a LoRA takes its strength once attached
        identity.set_strength(strength)
        motion.set_strength(strength)
        if reference is not None:
            motion.set_condition(reference)

    return attached_per_call(model, parts, "custvid_dualreal", on_enter)


def _clip_vision_input(name: str, tooltip: str):
    return io.ClipVisionOutput.Input(name, optional=True, tooltip=tooltip)


class TrainDualReal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_TrainDualReal",
            display_name="Train DualReal",
            category=CATEGORY,
            description="Learns your subject and a motion together (DualReal): an identity and a motion adapter in "
                        "every block, each learning while the other runs, and a StageBlender controller that "
                        "decides per denoising step and group of blocks how much of each to use. The input MODEL "
                        "is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan model from Load Diffusion Model (LoRAs may be applied)."),
                types.SubjectDataset.Input("subject", tooltip="From Subject Dataset: the identity steps learn its "
                                                              "photos (and its moving clips, if it has them)."),
                types.VideoDataset.Input("clips", tooltip="From Video Clips Dataset: the motion steps learn them."),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Training steps (the authors' 1000)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate after warm-up (a fifth of the steps, at most 200), "
                                       "then cosine decay to zero (the authors' 1e-3)."),
                io.Int.Input("groups", default=0, min=0, max=64,
                             tooltip="Groups of consecutive blocks the controller weighs apart. 0: the authors' 7 "
                                     "(one per block on a model with fewer blocks). At most the model's block count."),
                io.Int.Input("bottleneck", default=64, min=1, max=4096,
                             tooltip="Width of each adapter's bottleneck (the authors' 64)."),
                io.Float.Input("motion_probability", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="Share of the steps that learn the clips (motion); the others learn the "
                                       "subject (identity)."),
                io.Combo.Input("residual", options=list(RESIDUALS), default="code",
                               tooltip="code: each adapter adds its input back to its output (the authors' code). "
                                       "pure: it adds only its bottleneck's output (the paper), nothing at first."),
                io.Combo.Input("weighting", options=list(WEIGHTINGS), default="code",
                               tooltip="code: identity weight w and motion weight 0.2 - w, w in (0, 0.2) (the "
                                       "authors' code). paper: w and 1 - w, w in (0, 1)."),
                *noise_and_memory_inputs(),
                io.Int.Input("training_seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed for noise, batches, step kinds and the adapters' initialisation (fixed, "
                                     "so a rerun resumes)."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=100000,
                             tooltip="Write a checkpoint every N steps; a rerun with the same run_name resumes."),
                io.String.Input("run_name", default="custvid_dualreal",
                                tooltip="Folder under output/custvid_training/ for this run's checkpoint. A rerun with "
                                        "the same data, settings and model resumes it; another run trains afresh."),
                _clip_vision_input("clips_image", "CLIP Vision Encode of each clip's first frame, in the clips' "
                                                  "order (one image per clip): the motion adapters learn to take "
                                                  "it. Connect subject_image too. Optional."),
                _clip_vision_input("subject_image", "CLIP Vision Encode of the subject's reference image (or of "
                                                    "each photo): what the motion adapters see on the identity "
                                                    "steps and at sampling. Connect clips_image too. Optional."),
                _training_dtype_input(),
                io.Float.Input("controller_learning_rate", default=0.0, min=0.0, max=1e-1, step=1e-6, optional=True,
                               tooltip="The StageBlender controller's own learning rate. 0: the adapters' "
                                       "learning_rate (the authors'). If the run says its controller saturated "
                                       "(one adapter off in some blocks), try 1e-5."),
                *noise_range_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model"), types.DualReal.Output(display_name="dualreal"),
                     io.Image.Output(display_name="loss_graph")],
        )

    @classmethod
    def execute(cls, model, subject, clips, steps, learning_rate, groups, bottleneck, motion_probability, residual,
                weighting, timestep_sampling, shift, gradient_checkpointing, training_seed, checkpoint_every, run_name,
                clips_image=None, subject_image=None, training_dtype="auto",
                controller_learning_rate=0.0, noise_range="all", expert_boundary=EXPERT_BOUNDARY["t2v"]) -> io.NodeOutput:
        given = {"clips_image": clips_image, "subject_image": subject_image}
        missing = [name for name, v in given.items() if v is None]
        if len(missing) == 1:
            raise InputError(missing[0], "is not connected while the other CLIP vision input is",
                             "both clips_image and subject_image, or neither")
        embeddings = None if missing else ImageEmbeddings(*(_image_embeddings(v, n) for n, v in given.items()))
        authors = DualRealSettings()
        settings = dataclasses.replace(
            authors, bottleneck=bottleneck, groups=groups or None, residual=residual, weighting=weighting,
            motion_probability=motion_probability,
            sigmas=noise_levels(timestep_sampling, shift, noise_range, expert_boundary),
            gradient_checkpointing=gradient_checkpointing, controller_lr=controller_learning_rate or None,
            optim=dataclasses.replace(authors.optim, steps=steps, lr=learning_rate, seed=training_seed,
                                      checkpoint_every=checkpoint_every,
                                      warmup=min(authors.optim.warmup, steps // AUTHORS_WARMUP_SHARE)))
        folder = training_folder(run_name)
        notes, log = _run_log(run_name)
        with training_backbone(model) as (backbone, device, to_model):
            trained = train_dualreal(backbone, _data_in(to_model, subject), _data_in(to_model, clips), settings,
                                     embeddings, folder, training_progress(steps, "DualReal"), log, device=device,
                                     dtype=resolve_training_dtype(training_dtype, device),
                                     base_model=base_model_signature(model))
        weights = dualreal_weights(trained, settings.name)
        reference = None if embeddings is None else embeddings.subject.mean(dim=0, keepdim=True)
        text = "\n".join(notes or [f"trained {len(trained.history)} steps"])
        show_on_node(text)
        return io.NodeOutput(dualreal_model(model, weights, reference, 1.0), weights, loss_plot(trained.history),
                             ui=ui.PreviewText(text))


class ApplyDualReal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_ApplyDualReal",
            display_name="Apply DualReal",
            category=CATEGORY,
            description="Attaches a trained DualReal to a copy of the model: at every sampling step the controller "
                        "weighs the identity and motion adapters of each group of blocks from the step's noise level "
                        "and content. A joint LoRA run's dualreal: its two LoRAs, weighed by its controller (without "
                        "one: both at strength). The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model it was trained on (not changed; a copy is returned)."),
                types.DualReal.Input("dualreal", tooltip="From Train DualReal, Load DualReal or the dualreal output of "
                                                            "Train Subject and Motion LoRAs Jointly."),
                io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Multiplies both adapters' weights (1.0: as trained, 0.0: off)."),
                _clip_vision_input("clip_vision_output", "CLIP Vision Encode of the subject's reference image "
                                                         "(several images: their mean). Needed where the DualReal "
                                                         "was trained with CLIP vision inputs."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, dualreal, strength, clip_vision_output=None) -> io.NodeOutput:
        _fits(model, dualreal, "dualreal")
        return io.NodeOutput(dualreal_model(model, dualreal, _reference(dualreal, clip_vision_output), strength))


class SaveDualReal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveDualReal",
            display_name="Save DualReal",
            category=CATEGORY,
            description="Writes a trained DualReal (both adapters, or a joint run's two LoRAs, and the controller, with "
                        "the model size, groups, bottleneck and conditioning it was trained with) to "
                        "models/custvid/dualreal as one file.",
            is_output_node=True,
            inputs=[types.DualReal.Input("dualreal", tooltip="From Train DualReal or Train Subject and Motion LoRAs "
                                                               "Jointly."),
                    io.String.Input("filename", default="custvid/my_dualreal",
                                    tooltip="Name under models/custvid/dualreal (sub-folders allowed); .safetensors "
                                            "is added."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name.")],
            outputs=[io.String.Output(display_name="dualreal_name")],
        )

    @classmethod
    def execute(cls, dualreal, filename, overwrite) -> io.NodeOutput:
        if not isinstance(dualreal, DualRealWeights):
            raise InputError("dualreal", "is not a DualReal", "the output of Train DualReal or Load DualReal")
        root, path = safetensors_path(FOLDER, filename, "filename", overwrite)
        save_dualreal(path, dualreal)
        return io.NodeOutput(path.relative_to(root).as_posix())


class LoadDualReal(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadDualReal",
            display_name="Load DualReal",
            category=CATEGORY,
            description="Loads a DualReal saved by Save DualReal.",
            inputs=[io.Combo.Input("dualreal_name", options=model_files(FOLDER),
                                   tooltip="A file in models/custvid/dualreal.")],
            outputs=[types.DualReal.Output(display_name="dualreal")],
        )

    @classmethod
    def execute(cls, dualreal_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, dualreal_name)
        weights = load_dualreal(path, "dualreal_name")
        dualreal_parts(weights, input_name="dualreal_name")  # a damaged file is refused here, naming it
        return io.NodeOutput(weights)


class StageBlenderPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_StageBlenderPlot",
            display_name="StageBlender Plot",
            category=CATEGORY,
            description="Draws the identity weight the controller gives each group of blocks at each denoising step "
                        "of a prompt (DualReal's Figure 7; the motion weight is the rest). The prompt is denoised "
                        "without guidance along the model's simple schedule.",
            inputs=[
                io.Model.Input("model", tooltip="The model the DualReal was trained on (not changed)."),
                types.DualReal.Input("dualreal", tooltip="From Train DualReal, Load DualReal or Train Subject and "
                                                            "Motion LoRAs Jointly (with a controller)."),
                io.Conditioning.Input("conditioning", tooltip="The prompt, encoded by your text encoder."),
                io.Latent.Input("latent", tooltip="An empty latent of the size you sample (e.g. Empty Latent Video)."),
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="Denoising steps."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seed of the starting noise."),
                _clip_vision_input("clip_vision_output", "CLIP Vision Encode of the subject's reference image, "
                                                         "where the DualReal was trained with CLIP vision inputs."),
            ],
            outputs=[io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, model, dualreal, conditioning, latent, steps, seed, clip_vision_output=None) -> io.NodeOutput:
        import comfy.sample
        import comfy.samplers

        backbone = _fits(model, dualreal, "dualreal")
        reference = _reference(dualreal, clip_vision_output)
        context = _context(conditioning, "conditioning")[:1]
        samples = latent["samples"] if isinstance(latent, dict) and torch.is_tensor(latent.get("samples")) else None
        if samples is None or samples.ndim != 5:
            raise InputError("latent", "is not a video latent", "a video LATENT, e.g. from Empty Latent Video")
        sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps).float().cpu()
        noise = comfy.sample.prepare_noise(samples[:1], seed)
        parts = dualreal_parts(dualreal)
        with training_backbone(model) as (loaded, device, to_model):
            start = sampling.noise_scaling(sigmas[:1], noise, plain(to_model(samples[:1].float())))
            weights = weights_over_steps(loaded, parts, start, sigmas, context, reference, device,
                                         progress_callback(steps))
        of_block = block_groups(weights.shape[1], backbone.num_blocks)
        labels = [f"blocks {int(b[0])}-{int(b[-1])}" for b in (torch.nonzero(of_block == g).flatten()
                                                                 for g in range(weights.shape[1]))]
        return io.NodeOutput(series_plot(weights, labels, "identity weight per group of blocks"))


NODES = [TrainDualReal, ApplyDualReal, SaveDualReal, LoadDualReal, StageBlenderPlot]
