"""Estimate Training Memory: the peak GPU memory a LoRA training run on the connected model and dataset would need."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..custvid_core.backbones import describe
from ..custvid_core.backbones.estimate import RECIPES, estimate, latent_setup, size_of, stored_precision, table
from ..custvid_core.backbones.memory import MemorySettings
from ..custvid_core.errors import InputError
from ..custvid_core.training.datasets import buckets_of
from . import types
from .training_nodes import CATEGORY_TRAIN, memory_inputs


class EstimateTrainingMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_EstimateTrainingMemory",
            display_name="Estimate Training Memory",
            category=CATEGORY_TRAIN,
            description="Before training: the peak GPU memory a LoRA train node would need for this model and dataset "
                        "with these settings, and its parts (weights, LoRA and optimizer, activations, VAE and text "
                        "encoder). CustVid's estimator, checked against measured peaks (see the README).",
            inputs=[io.Model.Input("model", tooltip="The Wan model you will train (from Load Diffusion Model): its "
                                                    "blocks, width and weight precision are read from it."),
                    io.Combo.Input("recipe", options=list(RECIPES), default="subject",
                                   tooltip="subject: Train Subject LoRA (needs subject); motion: Train Motion LoRA "
                                           "(needs clips)."),
                    io.Int.Input("rank", default=32, min=1, max=512, tooltip="The LoRA rank you will train with."),
                    io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Items per training step."),
                    io.Boolean.Input("gradient_checkpointing", default=True,
                                     tooltip="As on the train node: recompute the blocks in the backward pass."),
                    io.Boolean.Input("encoders_loaded", default=False,
                                     tooltip="Count the VAE and the text encoder as staying on the GPU while training "
                                             "(ComfyUI usually moves them off when the model needs the room)."),
                    types.SubjectDataset.Input("subject", optional=True,
                                               tooltip="From Subject Dataset (for the subject recipe): its largest "
                                                       "items' latents (photos, or the preservation clips)."),
                    types.VideoDataset.Input("clips", optional=True,
                                             tooltip="From Video Dataset (for the motion recipe): its clips' latents."),
                    *memory_inputs()],
            outputs=[io.String.Output(display_name="estimate")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, recipe, rank, batch_size, gradient_checkpointing, encoders_loaded, subject=None, clips=None,
                recompute_every=1, offload_activations=False, blocks_to_swap=0) -> io.NodeOutput:
        if recipe == "subject" and subject is None:
            raise InputError("subject", "is not connected", "a Subject Dataset for the subject recipe")
        if recipe == "motion" and clips is None:
            raise InputError("clips", "is not connected", "a Video Dataset for the motion recipe")
        backbone = describe(model.model.diffusion_model)
        # A dataset in size buckets: the largest bucket's items set the peak.
        if recipe == "motion":
            latents = [s.latents for s in buckets_of(clips)]
        else:
            latents = [s.latents for s in buckets_of(subject)]
            if subject.preservation is not None:
                latents += [s.latents for s in buckets_of(subject.preservation)]
        largest = max((x.shape for x in latents), key=lambda s: s[-3] * s[-2] * s[-1])
        setup = latent_setup(size_of(backbone), largest, batch=batch_size, recipe=recipe, rank=rank,
                             precision=stored_precision(backbone),
                             memory=MemorySettings(recompute_every, offload_activations, blocks_to_swap),
                             vae_and_text_loaded=encoders_loaded, checkpointing=gradient_checkpointing)
        text = table(estimate(setup))
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [EstimateTrainingMemory]
