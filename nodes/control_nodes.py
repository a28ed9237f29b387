"""Training-free control inside ComfyUI's sampling: a latent-shift camera and box-steered subject paths.

The camera is a SAMPLER that wraps any of ComfyUI's samplers (for SamplerCustomAdvanced), or an
all-in-one sampler node; box steering is a MODEL patch (an attention override on a clone).
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..custvid_core.control.boxes import BoxSteering, BoxTrack, PromptSteering
from ..custvid_core.control.camera import MAX_ZOOM, CameraPath, LatentShift, StepWindow
from ..custvid_core.control.sampling import LatentView, SamplingControl, SamplingStep
from ..custvid_core.errors import InputError
from ..custvid_core.media import draw_boxes
from ..custvid_core.world.latent import FramesInChannels
from . import types
from .comfy_sampling import drive_controls
from .host import LATENT_LAYOUT, token_roles

CATEGORY = "CustVid/control"


class TimeAxis:
    """Wan's video latents: one latent frame per time step, on its own axis."""

    @staticmethod
    def frames(latent_frames: int) -> int:
        return latent_frames

    @staticmethod
    def as_frames(latent: torch.Tensor) -> torch.Tensor:
        return latent

    @staticmethod
    def from_frames(frames: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return frames


def conditioning_layout(conds) -> object:
    """How the latent holds time, as the text encoder put it in the conditioning (`LATENT_LAYOUT`, set by the
    shapes world's clip); Wan's video layout where none says otherwise. `conds`: the extras dicts of a
    CONDITIONING, or the cond dicts ComfyUI's sampling holds."""
    return next((c[LATENT_LAYOUT] for c in conds if c.get(LATENT_LAYOUT) is not None), TimeAxis())


def _sampling_layout(model) -> object:
    """The layout of the conditioning a sampler function samples with: its `model` wraps the guider that holds the
    positive and negative conds (comfy.samplers.KSAMPLER.sample)."""
    conds = getattr(getattr(model, "inner_model", None), "conds", None) or {}
    return conditioning_layout([c for part in conds.values() for c in part])


# The choice the deprecated camera nodes offered; the others read the layout from the conditioning.
VIDEO_LAYOUT = "video latent (Wan: one latent frame per time step)"
WORLD_LAYOUT = "shapes world (5 frames in each latent frame)"
LEGACY_LAYOUTS = {VIDEO_LAYOUT: TimeAxis(), WORLD_LAYOUT: FramesInChannels()}


# --- camera -----------------------------------------------------------------------------------------

def _camera_inputs(latent_layout: bool = False) -> list:
    """The camera's inputs; `latent_layout`: with the deprecated layout choice, where saved workflows have it."""
    return [
        io.Float.Input("pan_x", default=0.25, min=-1.0, max=1.0, step=0.01,
                       tooltip="Camera pan to the right over the whole clip, as a fraction of the frame width "
                               "(negative: left). The first frame stays; later frames move in proportion."),
        io.Float.Input("pan_y", default=0.0, min=-1.0, max=1.0, step=0.01,
                       tooltip="Camera pan downwards over the clip, as a fraction of the frame height (negative: up)."),
        io.Float.Input("zoom", default=1.0, min=1 / MAX_ZOOM, max=MAX_ZOOM, step=0.01,
                       tooltip="Zoom reached at the last frame, about the frame's centre (above 1: in, below 1: out)."),
        io.String.Input("camera_path", multiline=True, default="",
                        tooltip="Optional keyframes instead of the steady pan/zoom above, one per line "
                                "'time: pan_x, pan_y[, zoom]' with time from 0 (first frame) to 1 (last), "
                                "e.g. '0.5: 0.2, 0' then '1: 0.2, 0.1, 1.3'. Leave empty to use pan_x/pan_y/zoom."),
        io.Float.Input("window_start", default=0.2, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling steps where the shift starts (MotionBooth: step 10 of 50)."),
        io.Float.Input("window_end", default=0.4, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling steps where the shift ends (MotionBooth: step 20 of 50). "
                               "Earlier windows move more of the layout; later ones only the details."),
        *([io.Combo.Input("latent_layout", options=list(LEGACY_LAYOUTS), default=VIDEO_LAYOUT,
                          tooltip="How time is stored in the latent: Wan's video latents keep time on their own "
                                  "axis; the shapes world stores 5 frames in each latent frame's channels.")]
          if latent_layout else []),
        io.Int.Input("fill_seed", default=0, min=0, max=0xFFFFFFFF,
                     tooltip="Seed for choosing the latent cells that fill the strip the shift leaves empty."),
        types.Boxes.Input("subject_boxes", optional=True,
                          tooltip="Where the subject is (from Subject Boxes): the fill never copies from inside, "
                                  "so the subject is not duplicated into the new strip."),
    ]


def _camera_path(pan_x, pan_y, zoom, camera_path) -> CameraPath:
    if camera_path.strip():
        return CameraPath.parse(camera_path)
    try:
        return CameraPath.constant(pan_x, pan_y, zoom)
    except InputError as e:
        raise InputError("pan_x" if abs(pan_x) > 1 else "pan_y" if abs(pan_y) > 1 else "zoom",
                         e.problem, e.expected) from None


def _window(window_start, window_end) -> StepWindow:
    try:
        return StepWindow(window_start, window_end)
    except InputError as e:
        raise InputError("window_start" if window_start >= window_end else "window_end", e.problem, e.expected) from None


class CameraShift:
    """Builds the LatentShift for a latent of a given shape and applies it to that layout. With `schedule`
    (the whole schedule of a two-expert graph) the window is a part of it, wherever the sampler's own steps lie.
    `layout` (how the latent holds time): None reads it from the conditioning being sampled."""

    def __init__(self, path: CameraPath, window: StepWindow, layout, seed: int, boxes: BoxTrack | None,
                 schedule: torch.Tensor | None = None):
        self.path, self.window, self.layout, self.seed, self.boxes = path, window, layout, seed, boxes
        self.schedule = schedule

    def place(self, sigmas: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(the index of the sampler's first step in the whole schedule, the whole schedule)."""
        if self.schedule is None:
            return 0, sigmas
        whole, part = self.schedule.detach().float().cpu(), sigmas.detach().float().cpu()
        for offset in range(len(whole) - len(part) + 1):
            if torch.allclose(whole[offset:offset + len(part)], part, rtol=1e-4, atol=1e-6):
                return offset, whole
        raise InputError("schedule", "the sampler's sigmas are not a part of it",
                         "the SIGMAS the experts' SplitSigmas split (from the scheduler), or nothing")

    def shift(self, latent: torch.Tensor, steps: int, layout) -> LatentShift:
        if latent.ndim != 5:
            raise InputError("latent_image", f"a latent of shape {tuple(latent.shape)}",
                             "a video latent [batch, channels, frames, height, width] (Wan)")
        frames = layout.frames(latent.shape[2])
        boxes = None if self.boxes is None else self.boxes.per_frame(frames)[:, None]
        return LatentShift(self.path, steps, frames, self.window, boxes, self.seed)

    @staticmethod
    def control(mover: LatentShift, layout) -> SamplingControl:
        """The shift on the frames of a latent in `layout`."""
        return LatentView(mover, layout.as_frames, layout.from_frames)

    def sampler(self, inner) -> comfy.samplers.KSAMPLER:
        """Wraps a KSAMPLER: it runs range by range, and the latent is shifted after each window step.
        (Multistep samplers restart their history at each range inside the window.)"""
        if not isinstance(inner, comfy.samplers.KSAMPLER):
            raise InputError("sampler", f"a {type(inner).__name__}",
                             "one of ComfyUI's samplers (from KSamplerSelect or a sampler node)")
        camera = self

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            first, whole = camera.place(sigmas)
            last, total = first + len(sigmas) - 1, len(whole) - 1
            layout = camera.layout or _sampling_layout(model)
            mover = camera.shift(x, total, layout)
            control = camera.control(mover, layout)
            extra_args = dict(extra_args or {})
            for start, end in mover.segments(total):
                start, end = max(start, first), min(end, last)
                if start >= end:  # another expert's steps
                    continue
                args = dict(extra_args)
                if "seed" in args:  # new noise for each range of a stochastic sampler, not a repeat
                    args["seed"] = args["seed"] + start
                step_callback = None if callback is None else (
                    lambda d, offset=start - first: callback({**d, "i": d["i"] + offset}))
                x = inner.sampler_function(model, x, sigmas[start - first:end - first + 1], extra_args=args,
                                           callback=step_callback, disable=disable, **inner.extra_options)
                x = control.after_step(SamplingStep.of(end - 1, whole), x)
            return x

        return comfy.samplers.KSAMPLER(sample, inpaint_options=inner.inpaint_options)


def _camera(pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed, subject_boxes, schedule=None,
            latent_layout: str | None = None) -> CameraShift:
    layout = None
    if latent_layout is not None:
        if latent_layout not in LEGACY_LAYOUTS:
            raise InputError("latent_layout", f"'{latent_layout}'", f"one of {list(LEGACY_LAYOUTS)}")
        layout = LEGACY_LAYOUTS[latent_layout]
    return CameraShift(_camera_path(pan_x, pan_y, zoom, camera_path), _window(window_start, window_end),
                       layout, fill_seed, subject_boxes, schedule)


def _camera_sampler_schema(node_id: str, deprecated: bool) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name="Camera by Latent Shift (sampler)",
        category=CATEGORY,
        description=("Deprecated: use the one without latent_layout (it reads the layout from the conditioning). "
                     if deprecated else "") +
                    "Wraps a sampler for SamplerCustomAdvanced: pans/zooms the camera by shifting the noisy "
                    "latent between steps in a window of the schedule (MotionBooth; training-free). "
                    "For Wan 2.2's two experts, wrap both experts' samplers and give both the whole schedule.",
        inputs=[io.Sampler.Input("sampler", tooltip="The sampler to wrap (e.g. from KSamplerSelect)."),
                *_camera_inputs(latent_layout=deprecated),
                io.Sigmas.Input("schedule", optional=True,
                                tooltip="For two-expert graphs (Wan 2.2): the whole schedule, i.e. the SIGMAS "
                                        "before SplitSigmas. The window is then a part of the whole schedule and "
                                        "the camera moves in whichever expert's steps it falls. Leave empty "
                                        "when one sampler runs the whole schedule.")],
        outputs=[io.Sampler.Output()],
        is_deprecated=deprecated,
    )


class CameraShiftSamplerV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _camera_sampler_schema("CustVid_CameraShiftSamplerV2", deprecated=False)

    @classmethod
    def execute(cls, sampler, pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed,
                subject_boxes=None, schedule=None) -> io.NodeOutput:
        camera = _camera(pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed, subject_boxes, schedule)
        return io.NodeOutput(camera.sampler(sampler))


class CameraShiftSampler(io.ComfyNode):
    """Kept for saved workflows: the layout is a choice here."""

    @classmethod
    def define_schema(cls):
        return _camera_sampler_schema("CustVid_CameraShiftSampler", deprecated=True)

    @classmethod
    def execute(cls, sampler, pan_x, pan_y, zoom, camera_path, window_start, window_end, latent_layout, fill_seed,
                subject_boxes=None, schedule=None) -> io.NodeOutput:
        camera = _camera(pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed, subject_boxes, schedule,
                         latent_layout)
        return io.NodeOutput(camera.sampler(sampler))


def _camera_sample_schema(node_id: str, deprecated: bool) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name="Sample with Camera (latent shift)",
        category=CATEGORY,
        description=("Deprecated: use the one without latent_layout (it reads the layout from the conditioning). "
                     if deprecated else "") +
                    "KSampler with a camera pan/zoom by latent shift, for graphs without SamplerCustomAdvanced.",
        inputs=[
            io.Model.Input("model", tooltip="The video model."),
            io.Conditioning.Input("positive", tooltip="What to generate."),
            io.Conditioning.Input("negative", tooltip="What to avoid."),
            io.Latent.Input("latent_image", tooltip="The empty (or partly noised) video latent."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                         tooltip="Noise seed."),
            io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Sampling steps."),
            io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
            io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                           tooltip="Sampler."),
            io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                           tooltip="Noise schedule."),
            *_camera_inputs(latent_layout=deprecated),
        ],
        outputs=[io.Latent.Output()],
        is_deprecated=deprecated,
    )


def _camera_sample(camera: CameraShift, model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                   scheduler) -> dict:
    latent = latent_image["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    # checks the latent's shape before any sampling
    camera.shift(latent, steps, camera.layout or conditioning_layout([c[1] for c in positive + negative]))
    sampler = camera.sampler(comfy.samplers.sampler_object(sampler_name))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                         noise_mask=latent_image.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent_image.copy()
    out["samples"] = samples
    return out


class CameraSampleV2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _camera_sample_schema("CustVid_CameraSampleV2", deprecated=False)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, pan_x, pan_y,
                zoom, camera_path, window_start, window_end, fill_seed, subject_boxes=None) -> io.NodeOutput:
        camera = _camera(pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed, subject_boxes)
        return io.NodeOutput(_camera_sample(camera, model, positive, negative, latent_image, seed, steps, cfg,
                                            sampler_name, scheduler))


class CameraSample(io.ComfyNode):
    """Kept for saved workflows: the layout is a choice here."""

    @classmethod
    def define_schema(cls):
        return _camera_sample_schema("CustVid_CameraSample", deprecated=True)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, pan_x, pan_y,
                zoom, camera_path, window_start, window_end, latent_layout, fill_seed,
                subject_boxes=None) -> io.NodeOutput:
        camera = _camera(pan_x, pan_y, zoom, camera_path, window_start, window_end, fill_seed, subject_boxes,
                         latent_layout=latent_layout)
        return io.NodeOutput(_camera_sample(camera, model, positive, negative, latent_image, seed, steps, cfg,
                                            sampler_name, scheduler))


# --- boxes ------------------------------------------------------------------------------------------

class SubjectBoxes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SubjectBoxes",
            display_name="Subject Boxes",
            category=CATEGORY,
            description="The subject's box over the clip: keyframes interpolated to every frame, or read from a "
                        "mask sequence. For Box Steering and the camera's fill.",
            inputs=[
                io.String.Input("keyframes", multiline=True, default="0: 0.05, 0.3, 0.35, 0.7\n1: 0.65, 0.3, 0.95, 0.7",
                                tooltip="One box per line, 'time: x1, y1, x2, y2': time from 0 (first frame) to 1 "
                                        "(last), corners as fractions of the frame (0..1, x1 < x2, y1 < y2). "
                                        "Ignored when masks are connected."),
                io.Mask.Input("masks", optional=True,
                              tooltip="A mask per frame (e.g. a tracked subject): each frame's box is the mask's extent."),
            ],
            outputs=[types.Boxes.Output(display_name="boxes")],
        )

    @classmethod
    def execute(cls, keyframes, masks=None) -> io.NodeOutput:
        if masks is not None:
            return io.NodeOutput(BoxTrack.from_masks(masks))
        try:
            return io.NodeOutput(BoxTrack.parse(keyframes))
        except InputError as e:
            raise InputError("keyframes", e.problem, e.expected) from None


class DrawBoxes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_DrawBoxes",
            display_name="Draw Subject Boxes",
            category=CATEGORY,
            description="Outlines the boxes over frames, to check a path before sampling or the result after.",
            inputs=[io.Image.Input("images", tooltip="Frames of a clip (any size)."),
                    types.Boxes.Input("boxes", tooltip="From Subject Boxes.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, images, boxes) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] == 0:
            raise InputError("images", "the batch is empty" if images.ndim == 4 else f"shape {tuple(images.shape)}",
                             "at least one frame")
        return io.NodeOutput(draw_boxes(images, boxes.per_frame(images.shape[0])))


def _parse_blocks(text: str, count: int) -> frozenset[int] | None:
    """The blocks named by `text` ('all', or numbers and ranges) among a model's `count` blocks."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    expected = f"'all' or block numbers and ranges from 0 to {count - 1}, such as '0-{min(9, count - 1)}'"
    blocks: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise InputError("blocks", f"'{text}'", expected) from None
        if not 0 <= first <= last < count:
            raise InputError("blocks", f"'{part.strip()}' is not a range of this model's {count} blocks", expected)
        blocks.update(range(first, last + 1))
    return frozenset(blocks)


def steering_patch(model, steering: BoxSteering):
    """A clone of `model` whose text cross-attention follows `steering` in the conditional pass."""
    return drive_controls(model, [PromptSteering([steering])], f"custvid_box_steering_{id(steering)}")


class BoxSteeringNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_BoxSteering",
            display_name="Box Steering (subject path)",
            category=CATEGORY,
            description="Makes the subject follow boxes without training: in the conditional pass the subject words' "
                        "cross-attention is raised inside each frame's box early in sampling, and the prompt's other "
                        "words are muted (MotionBooth). Returns a patched copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip="The video model (not changed; a patched copy is returned)."),
                types.Boxes.Input("boxes", tooltip="The subject's path, from Subject Boxes."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt, exactly as in the text encode node: the subject words "
                                        "are located in it."),
                io.String.Input("subject_words", default="",
                                tooltip="The subject's words in the prompt (e.g. 'dog' or 'sks dog')."),
                io.Float.Input("alpha", default=10.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Boost of the subject inside its box (MotionBooth: 10; 5 to 7.5 for large "
                                       "boxes; high values make the subject look boxy)."),
                io.Float.Input("tau", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling steps the boost lasts (MotionBooth: 15 of 50 = 0.3)."),
                io.String.Input("blocks", default="all",
                                tooltip="Blocks to steer: 'all' or numbers and ranges such as '0-19'."),
                io.String.Input("background_words", default="",
                                tooltip="Optional words of the prompt describing the background: kept outside the box "
                                        "and muted inside it. Other prompt words are muted everywhere."),
                *types.tokenizer_inputs("subject and background words"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, boxes, prompt, subject_words, alpha, tau, blocks, background_words, clip=None,
                world_text=None) -> io.NodeOutput:
        network = model.get_model_object("diffusion_model")
        if not isinstance(getattr(network, "blocks", None), torch.nn.ModuleList):
            raise InputError("model", f"a {type(network).__name__}, which has no transformer blocks to steer",
                             "a Wan video model")
        chosen = _parse_blocks(blocks, len(network.blocks))
        roles = token_roles(prompt, subject_words, clip or world_text, background_words)
        steering = BoxSteering(boxes, roles, alpha=alpha, tau=tau, blocks=chosen)
        return io.NodeOutput(steering_patch(model, steering))


NODES = [CameraShiftSamplerV2, CameraSampleV2, SubjectBoxes, DrawBoxes, BoxSteeringNode, CameraShiftSampler, CameraSample]
