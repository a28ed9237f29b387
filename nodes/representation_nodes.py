"""Nodes for SMRABooth's representations: DINOv2 subject features and RAFT motion flow."""

from __future__ import annotations

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..custvid_core.representations import motion, storage, subject
from . import types
from .host import ManagedModel, model_files, progress_callback, safetensors_path

CATEGORY_LOADERS = "CustVid/loaders"
CATEGORY_REPRESENTATIONS = "CustVid/representations"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _dtype(precision: str, device):
    import torch

    if precision == "auto":
        return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
    return getattr(torch, PRECISIONS[precision])


class LoadDINOv2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadDINOv2",
            display_name="Load DINOv2 (subject encoder)",
            category=CATEGORY_LOADERS,
            description="Loads a DINOv2 image encoder for subject representations (SMRABooth's SuRA).",
            inputs=[
                io.Combo.Input("dino_name", options=model_files("custvid_dino"),
                               tooltip="DINOv2 weights in models/custvid/dino/: a transformers folder "
                                       "(config.json + model.safetensors, e.g. facebook/dinov2-base) or one "
                                       "safetensors/pth file with transformers' Dinov2Model weights."),
                io.Combo.Input("precision", options=["auto", *PRECISIONS], default="auto",
                               tooltip="Weight precision. auto: fp16 where the device supports it, else fp32."),
            ],
            outputs=[types.DinoModel.Output(display_name="dino")],
        )

    @classmethod
    def execute(cls, dino_name, precision) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("custvid_dino", dino_name)
        encoder = subject.load_dinov2(path, input_name="dino_name")
        dtype = _dtype(precision, comfy.model_management.get_torch_device())
        return io.NodeOutput(ManagedModel.wrap(encoder, encoder.model, dtype))


class LoadRAFT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadRAFT",
            display_name="Load RAFT (motion encoder)",
            category=CATEGORY_LOADERS,
            description="Loads torchvision's RAFT optical-flow network for motion representations (SMRABooth's MoRA).",
            inputs=[
                io.Combo.Input("raft_name", options=model_files("custvid_raft"),
                               tooltip="RAFT weights in models/custvid/raft/: torchvision's raft_large or "
                                       "raft_small checkpoint (.pth) or the same weights as .safetensors. "
                                       "The variant is detected from the file."),
            ],
            outputs=[types.RaftModel.Output(display_name="raft")],
        )

    @classmethod
    def execute(cls, raft_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("custvid_raft", raft_name)
        encoder = motion.load_raft(path, input_name="raft_name")
        # RAFT's correlation volume loses precision in fp16, so it stays in fp32.
        return io.NodeOutput(ManagedModel.wrap(encoder, encoder.model))


class SubjectRepresentation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SubjectRepresentation",
            display_name="Subject Representation (DINOv2)",
            category=CATEGORY_REPRESENTATIONS,
            description="DINOv2 features of your subject's reference images: patch tokens, CLS and a "
                        "mask-pooled object feature. Training aligns the subject LoRA with them.",
            inputs=[
                types.DinoModel.Input("dino", tooltip="The encoder from Load DINOv2."),
                io.Image.Input("images", tooltip="Reference photos of the subject, one batch of any count."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional subject masks (white = subject), one per image and the same "
                                      "size. Without masks the object feature pools the whole image."),
                io.Int.Input("resolution", default=448, min=8, max=subject.MAX_RESOLUTION, step=2,
                             tooltip="Images are fitted to this square before DINOv2; a multiple of the "
                                     "encoder's patch size (14 for DINOv2, 4 for the shapes world's). "
                                     "SMRABooth uses 448."),
                io.Combo.Input("fit", options=list(subject.FIT_MODES), default="pad",
                               tooltip="pad: keep the aspect ratio, pad to a square. stretch: resize to a square."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images per DINOv2 call; lower it if memory runs out."),
            ],
            outputs=[types.SubjectRepresentation.Output(display_name="subject_representation")],
        )

    @classmethod
    def execute(cls, dino, images, resolution, fit, batch_size, masks=None) -> io.NodeOutput:
        encoder = dino.load()
        rep = subject.extract_subject(encoder, images, masks, resolution=resolution, fit=fit,
                                      batch_size=batch_size, progress=progress_callback(images.shape[0]))
        return io.NodeOutput(rep)


class MotionRepresentation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_MotionRepresentation",
            display_name="Motion Representation (RAFT)",
            category=CATEGORY_REPRESENTATIONS,
            description="RAFT optical flow of a reference clip, with the subject's mean motion and "
                        "trajectory. Training aligns the motion LoRA with it.",
            inputs=[
                types.RaftModel.Input("raft", tooltip="The flow network from Load RAFT."),
                io.Image.Input("frames", tooltip="The frames of one clip in order (at least 2), e.g. from "
                                                 "Load Video + Get Video Components."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional subject masks, one per frame and the same size. Without masks "
                                      "the subject is taken to be the moving pixels."),
                io.Int.Input("iterations", default=12, min=1, max=64,
                             tooltip="RAFT refinement steps per frame pair; 12 is RAFT's default."),
                io.Int.Input("max_side", default=512, min=motion.MIN_WORK_SIDE, max=4096, step=8,
                             tooltip="Frames larger than this are downscaled for RAFT (the flow is mapped "
                                     "back to full size). Lower is faster and uses less memory."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Frame pairs per RAFT call; lower it if memory runs out."),
            ],
            outputs=[types.MotionRepresentation.Output(display_name="motion_representation")],
        )

    @classmethod
    def execute(cls, raft, frames, iterations, max_side, batch_size, masks=None) -> io.NodeOutput:
        encoder = raft.load()
        rep = motion.extract_motion(encoder, frames, masks, iterations=iterations, max_side=max_side,
                                    batch_size=batch_size,
                                    progress=progress_callback(max(1, frames.shape[0] - 1)))
        return io.NodeOutput(rep)


class FlowPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_FlowPreview",
            display_name="Flow Preview",
            category=CATEGORY_REPRESENTATIONS,
            description="Colour-coded optical flow of a motion representation (hue = direction, "
                        "saturation = speed, one scale for the whole clip).",
            inputs=[types.MotionRepresentation.Input("motion_representation",
                                                     tooltip="From Motion Representation or Load Motion Representation.")],
            outputs=[io.Image.Output(display_name="flow_images")],
        )

    @classmethod
    def execute(cls, motion_representation) -> io.NodeOutput:
        return io.NodeOutput(motion.flow_preview(motion_representation))


class SaveRepresentation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveRepresentation",
            display_name="Save Representation",
            category=CATEGORY_REPRESENTATIONS,
            description="Saves a subject or motion representation to models/custvid/representations/ "
                        "so other graphs can load it without the encoder.",
            inputs=[
                io.MultiType.Input("representation",
                                   types=[types.SubjectRepresentation, types.MotionRepresentation],
                                   tooltip="A subject or motion representation."),
                io.String.Input("file_name", default="my_subject",
                                tooltip="Name under models/custvid/representations/ (subfolders allowed, "
                                        "'.safetensors' added). An existing file of that name is replaced."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, representation, file_name) -> io.NodeOutput:
        _, target = safetensors_path("custvid_representations", file_name, "file_name")
        storage.save_representation(representation, target)
        return io.NodeOutput(ui={"text": [f"saved {target.name}"]})


def _load_node(node_id: str, display: str, kind: str, out_type):
    class LoadRepresentation(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id,
                display_name=display,
                category=CATEGORY_REPRESENTATIONS,
                description=f"Loads a {kind} representation saved by Save Representation.",
                inputs=[io.Combo.Input("representation_name", options=model_files("custvid_representations"),
                                       tooltip=f"A {kind} representation file in models/custvid/representations/.")],
                outputs=[out_type.Output(display_name=f"{kind}_representation")],
            )

        @classmethod
        def execute(cls, representation_name) -> io.NodeOutput:
            path = folder_paths.get_full_path_or_raise("custvid_representations", representation_name)
            return io.NodeOutput(storage.load_representation(path, kind, input_name="representation_name"))

    LoadRepresentation.__name__ = node_id.removeprefix("CustVid_")
    return LoadRepresentation


LoadSubjectRepresentation = _load_node("CustVid_LoadSubjectRepresentation", "Load Subject Representation",
                                       "subject", types.SubjectRepresentation)
LoadMotionRepresentation = _load_node("CustVid_LoadMotionRepresentation", "Load Motion Representation",
                                      "motion", types.MotionRepresentation)

NODES = [LoadDINOv2, LoadRAFT, SubjectRepresentation, MotionRepresentation, FlowPreview,
         SaveRepresentation, LoadSubjectRepresentation, LoadMotionRepresentation]
