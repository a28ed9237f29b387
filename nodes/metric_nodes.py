"""Nodes that measure generated videos with the papers' metrics (custvid_core.eval)."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..custvid_core.control.camera import CameraPath
from ..custvid_core.errors import InputError
from ..custvid_core.eval import clip as clip_encoder
from ..custvid_core.eval import measure, report
from ..custvid_core.media import side_by_side
from . import types
from .host import ManagedModel, model_files, progress_callback

CATEGORY = "CustVid/metrics"


class LoadCLIPForMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadCLIPForMetrics",
            display_name="Load CLIP (metrics)",
            category=CATEGORY,
            description="Loads a CLIP model (transformers format) for CLIP-T, CLIP-I, R-CLIP and T.Cons.",
            inputs=[io.Combo.Input("clip_name", options=model_files("custvid_clip"),
                                   tooltip="A CLIP folder in models/custvid/clip/ (e.g. openai/clip-vit-large-patch14 "
                                           "from Hugging Face: config.json, model.safetensors and the tokenizer's "
                                           "files); pick its weights file.")],
            outputs=[types.ClipModel.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        path = Path(folder_paths.get_full_path_or_raise("custvid_clip", clip_name))
        encoder = clip_encoder.load_clip(path.parent, input_name="clip_name")
        return io.NodeOutput(ManagedModel.wrap(encoder, encoder.model))


def _measure_inputs() -> list:
    """What a video is measured with and against, all optional (a metric whose inputs are missing is left out)."""
    return [
        types.ClipModel.Input("clip", optional=True, tooltip="From Load CLIP (metrics): CLIP-T, CLIP-I, R-CLIP, T.Cons."),
        types.DinoModel.Input("dino", optional=True, tooltip="From Load DINOv2: DINO-I and R-DINO (with reference photos)."),
        types.RaftModel.Input("raft", optional=True,
                              tooltip="From Load RAFT: flicker, motion smoothness, dynamic degree; with a reference "
                                      "clip motion fidelity; with a camera path or boxes their flow error."),
        io.String.Input("prompt", multiline=True, default="", optional=True,
                        tooltip="The prompt the video was generated from (CLIP-T); empty: not measured."),
        io.Image.Input("reference_photos", optional=True,
                       tooltip="Photos of your subject (any count, one size): CLIP-I and DINO-I compare every frame "
                               "with every photo."),
        io.Mask.Input("reference_masks", optional=True,
                      tooltip="The subject in each reference photo (white = subject), one per photo: R-CLIP / R-DINO "
                              "crop around it. Without them the whole photo is the subject."),
        io.Image.Input("reference_clip", optional=True,
                       tooltip="A clip of the motion you customized (at least 2 frames): motion fidelity and the "
                               "dynamic degree's deviation from it."),
        io.Mask.Input("subject_masks", optional=True,
                      tooltip="The subject in the video's frames, one mask per frame: the region of R-CLIP / R-DINO "
                              "(else the boxes) and left out of the camera's flow error."),
        types.Boxes.Input("boxes", optional=True,
                          tooltip="The subject's commanded path (Subject Boxes): its box flow error, and the region of "
                                  "R-CLIP / R-DINO when no subject masks are given."),
        io.String.Input("camera_path", default="", optional=True,
                        tooltip="The commanded camera path as the camera nodes take it (e.g. '1: 0.25, 0' for a pan "
                                "of a quarter frame to the right over the clip): camera flow error. Empty: none."),
        io.Int.Input("batch_size", default=8, min=1, max=128, optional=True,
                     tooltip="Frames (or frame pairs) per encoder call; lower it if memory runs out."),
    ]


def _measure(frames, frames_input: str, clip=None, dino=None, raft=None, prompt="", reference_photos=None,
             reference_masks=None, reference_clip=None, subject_masks=None, boxes=None, camera_path="",
             batch_size=8) -> dict[str, float]:
    encoders = measure.Encoders(clip=clip.load() if clip else None, dino=dino.load() if dino else None,
                                raft=raft.load() if raft else None, batch_size=batch_size)
    targets = measure.Targets(prompt=prompt, photos=reference_photos, photo_masks=reference_masks,
                              clips=[] if reference_clip is None else [reference_clip], masks=subject_masks,
                              boxes=boxes, camera=CameraPath.parse(camera_path) if camera_path.strip() else None)
    try:
        return measure.measure_video(frames, targets, encoders, progress=progress_callback(1))
    except InputError as e:
        if e.input_name != "frames":
            raise
        raise InputError(frames_input, e.problem, e.expected) from None


class MeasureVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_MeasureVideo",
            display_name="Measure Video",
            category=CATEGORY,
            description="The papers' metrics of a generated video: how well it shows your subject (CLIP-I, DINO-I, "
                        "R-CLIP, R-DINO) and prompt (CLIP-T), how steady it is (T.Cons, flicker, motion smoothness), "
                        "how it moves (dynamic degree, motion fidelity to a reference clip) and how it follows a "
                        "camera or box path (flow error). Connect what you have; the rest is left out.",
            inputs=[io.Image.Input("frames", tooltip="The generated video's frames (at least 2)."), *_measure_inputs()],
            outputs=[io.String.Output(display_name="scores"), io.Image.Output(display_name="chart")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, frames, **optional) -> io.NodeOutput:
        scores = _measure(frames, "frames", **optional)
        text = report.scores_text(scores)
        return io.NodeOutput(text, report.score_chart([scores], ["video"]), ui=ui.PreviewText(text))


class CompareRuns(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_CompareRuns",
            display_name="Compare Runs",
            category=CATEGORY,
            description="Two videos of the same prompt (e.g. without and with your LoRA) measured with the same "
                        "references, side by side: a table of both runs' metrics and their difference, a chart, "
                        "and the two videos next to each other.",
            inputs=[io.Image.Input("frames_a", tooltip="The first run's frames (e.g. the base model's)."),
                    io.Image.Input("frames_b", tooltip="The second run's frames (e.g. the customized model's)."),
                    io.String.Input("label_a", default="base", tooltip="The first run's name in the table and chart."),
                    io.String.Input("label_b", default="customized", tooltip="The second run's name."),
                    *_measure_inputs()],
            outputs=[io.String.Output(display_name="comparison"), io.Image.Output(display_name="chart"),
                     io.Image.Output(display_name="side_by_side")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, frames_a, frames_b, label_a, label_b, **optional) -> io.NodeOutput:
        a, b = _measure(frames_a, "frames_a", **optional), _measure(frames_b, "frames_b", **optional)
        labels = (label_a.strip() or "a", label_b.strip() or "b")
        text = report.comparison_text(a, b, labels)
        return io.NodeOutput(text, report.score_chart([a, b], list(labels)), side_by_side(frames_a, frames_b),
                             ui=ui.PreviewText(text))


NODES = [LoadCLIPForMetrics, MeasureVideo, CompareRuns]
