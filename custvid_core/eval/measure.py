"""Every metric a video's inputs allow, computed in one pass: each encoder runs once over the frames, in batches.

What is measured depends on what is given: the prompt and CLIP give CLIP-T; reference photos give CLIP-I and
DINO-I; a region of the subject (its masks in the video, or its boxes) adds R-CLIP and R-DINO; RAFT gives
flicker, motion smoothness and dynamic degree; reference clips add the dynamic degree's deviation from theirs
and motion fidelity; a camera path or a box path adds its flow error. The rest are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..control.boxes import BoxTrack, cells_in_boxes
from ..control.camera import CameraPath
from ..errors import InputError
from ..images import as_image_list, as_mask_list, mask_boxes, stack_same_size
from ..representations.motion import RaftEncoder, compute_flow
from ..representations.subject import DinoEncoder, extract_subject
from . import metrics
from .clip import ClipEncoder, image_features, text_features

# name -> (what it is, which way is better)
METRICS: dict[str, tuple[str, str]] = {
    "clip_t": ("CLIP cosine of the frames with the prompt", "higher"),
    "clip_i": ("CLIP cosine of the frames with the reference photos", "higher"),
    "dino_i": ("DINOv2 CLS cosine of the frames with the reference photos", "higher"),
    "r_clip": ("CLIP-I on crops around the subject", "higher"),
    "r_dino": ("DINO-I on crops around the subject", "higher"),
    "t_cons": ("CLIP cosine of consecutive frames", "higher"),
    "flicker": ("mean change of static pixels between frames (0-1)", "lower"),
    "motion_smoothness": ("1 - error of frames interpolated along the flow", "higher"),
    "dynamic_degree": ("top-5% flow magnitude, pixels at a 256-pixel side", "nearer the references"),
    "dynamic_degree_deviation": ("|dynamic degree - the reference clips' mean|", "lower"),
    "motion_fidelity": ("velocity cosine of RAFT point tracks with the reference clips'", "higher"),
    "camera_flow_error": ("pixels between the background's flow and the camera path's", "lower"),
    "box_flow_error": ("pixels between the subject's flow and its box path's", "lower"),
}
DINO_SIDE = 224  # DINO-I's input side (DINOv2's pretraining crop), or the encoder's own image size when smaller


@dataclass
class Encoders:
    """The models the metrics use; any may be missing (its metrics are then NaN)."""

    clip: ClipEncoder | None = None
    dino: DinoEncoder | None = None
    raft: RaftEncoder | None = None
    flow_iterations: int = 12
    flow_max_side: int = 512
    batch_size: int = 8


@dataclass
class Targets:
    """What a video is measured against. `photos` (+ `photo_masks`, white = subject) are the subject's reference
    photos; `clips` the reference clips of the motion (or `clip_flows`, their RAFT flow when already computed, e.g.
    for many videos measured against the same clips); `masks` the subject in the generated frames (or `boxes`, its
    commanded path, which also gives the box flow error); `camera` the commanded camera path."""

    prompt: str = ""
    photos: torch.Tensor | Sequence[torch.Tensor] | None = None
    photo_masks: torch.Tensor | Sequence[torch.Tensor] | None = None
    clips: Sequence[torch.Tensor] = field(default_factory=list)
    clip_flows: Sequence[torch.Tensor] | None = None
    masks: torch.Tensor | None = None
    boxes: BoxTrack | None = None
    camera: CameraPath | None = None


class _Progress:
    """One bar over every encoder pass; `part(size)` gives a stage's `progress(done, total)` callback."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None):
        self.total, self.done = max(total, 1), 0
        self.bar = None
        if report is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="CustVid metrics", unit="image")
            report = lambda done, total: self.bar.update(done - self.bar.n)  # noqa: E731
        self.report = report

    def part(self, size: int) -> Callable[..., None]:
        start = self.done
        self.done += size
        return lambda done, *_: self.report(min(start + done, self.total), self.total)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def dino_resolution(dino: DinoEncoder) -> int:
    """The side DINO-I fits images to: DINO_SIDE, or the encoder's own image size when smaller, in whole patches."""
    side = min(DINO_SIDE, int(dino.model.config.image_size))
    return max(dino.patch_size, side // dino.patch_size * dino.patch_size)


def _dino_cls(dino: DinoEncoder, images, resolution: int, batch_size: int, progress) -> torch.Tensor:
    rep = extract_subject(dino, images, resolution=resolution, fit="pad", batch_size=batch_size, progress=progress)
    return F.normalize(rep.cls_token.float(), dim=-1)


def _clip_photos(clip: ClipEncoder, photos: list[torch.Tensor], progress) -> torch.Tensor:
    """CLIP features of photos of any sizes (one call per photo: references are few)."""
    out = [image_features(clip, photo[None]) for photo in photos]
    progress(len(photos))
    return torch.cat(out)


def _photo_crops(photos: list[torch.Tensor], masks: list[torch.Tensor] | None, size: int) -> torch.Tensor:
    """Square crops of the photos around their masks' boxes (the whole photo without masks)."""
    crops = []
    for i, photo in enumerate(photos):
        box = mask_boxes(masks[i][None])[0] if masks is not None else torch.tensor([0.0, 0.0, 1.0, 1.0])
        crops.append(metrics.region_crops(photo[None], box[None], size)[0])
    return torch.stack(crops)


def _subject_boxes(targets: Targets, frames: int) -> torch.Tensor | None:
    """The subject's box `[F, 4]` per generated frame: from its masks, else its commanded boxes."""
    if targets.masks is not None:
        return mask_boxes(targets.masks)
    if targets.boxes is not None:
        return targets.boxes.per_frame(frames)
    return None


def _check(frames, targets: Targets) -> tuple[torch.Tensor, list | None, list | None, list[torch.Tensor]]:
    clip = stack_same_size(as_image_list(frames, "frames", min_count=2), "frames")
    photos = as_image_list(targets.photos, "reference_photos") if targets.photos is not None else None
    if photos is None and targets.photo_masks is not None:
        raise InputError("reference_masks", "they were given without reference photos", "the photos they belong to")
    photo_masks = as_mask_list(targets.photo_masks, photos, "reference_masks") if photos is not None else None
    if photo_masks is not None and any(float(m.max()) <= 0.5 for m in photo_masks):
        raise InputError("reference_masks", "a mask is empty", "masks that mark the subject in every photo")
    if targets.masks is not None:
        as_mask_list(targets.masks, list(clip), "subject_masks")
        if bool((targets.masks.flatten(1).amax(1) <= 0.5).all()):
            raise InputError("subject_masks", "every mask is empty", "masks that mark the subject in the frames")
    clips = [stack_same_size(as_image_list(c, "reference_clip", min_count=2), "reference_clip")
             for c in targets.clips]
    return clip, photos, photo_masks, clips


def measure_video(frames: torch.Tensor, targets: Targets, encoders: Encoders,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Every metric of METRICS for one generated clip `[F, H, W, 3]` (NaN where an input is missing).
    `progress(done, total)` counts images through the encoders; without it a tqdm bar is shown."""
    clip_frames, photos, photo_masks, reference_clips = _check(frames, targets)
    if encoders.batch_size < 1:
        raise InputError("batch_size", f"{encoders.batch_size} is below 1", "a batch size of 1 or more")
    n, h, w, _ = clip_frames.shape
    scores = dict.fromkeys(METRICS, math.nan)
    boxes = _subject_boxes(targets, n)
    present = None if boxes is None else (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    regions = present is not None and photos is not None and bool(present.any())
    clip, dino, raft = encoders.clip, encoders.dino, encoders.raft
    work = 0
    if clip is not None:
        work += n + (len(photos) if photos else 0) + (int(present.sum()) if regions else 0)
    if dino is not None and photos is not None:
        work += n + len(photos) + (int(present.sum()) + len(photos) if regions else 0)
    if raft is not None:
        work += n - 1 + (0 if targets.clip_flows is not None else sum(len(c) - 1 for c in reference_clips))
    bar = _Progress(work, progress)
    try:
        if clip is not None:
            frame_features = image_features(clip, clip_frames, encoders.batch_size, bar.part(n))
            scores["t_cons"] = metrics.temporal_consistency(frame_features)
            if targets.prompt.strip():
                scores["clip_t"] = metrics.mean_cosine(frame_features, text_features(clip, [targets.prompt]))
            if photos is not None:
                scores["clip_i"] = metrics.mean_cosine(frame_features, _clip_photos(clip, photos, bar.part(len(photos))))
            if regions:
                crops = metrics.region_crops(clip_frames[present], boxes[present], clip.image_size)
                crop_features = image_features(clip, crops, encoders.batch_size, bar.part(len(crops)))
                reference = _photo_crops(photos, photo_masks, clip.image_size)
                scores["r_clip"] = metrics.mean_cosine(crop_features, image_features(clip, reference))
        if dino is not None and photos is not None:
            side = dino_resolution(dino)
            frame_cls = _dino_cls(dino, clip_frames, side, encoders.batch_size, bar.part(n))
            scores["dino_i"] = metrics.mean_cosine(
                frame_cls, _dino_cls(dino, photos, side, encoders.batch_size, bar.part(len(photos))))
            if regions:
                crops = metrics.region_crops(clip_frames[present], boxes[present], side)
                reference = _photo_crops(photos, photo_masks, side)
                scores["r_dino"] = metrics.mean_cosine(
                    _dino_cls(dino, crops, side, encoders.batch_size, bar.part(len(crops))),
                    _dino_cls(dino, reference, side, encoders.batch_size, bar.part(len(photos))))
        if raft is not None:
            def flow_of(c):
                return compute_flow(raft, c, encoders.flow_iterations, encoders.flow_max_side, encoders.batch_size,
                                    bar.part(len(c) - 1))

            flow = flow_of(clip_frames)
            clip_flows = targets.clip_flows if targets.clip_flows is not None else [flow_of(c) for c in reference_clips]
            scores.update(_motion_scores(clip_frames, flow, list(clip_flows), targets, boxes))
    finally:
        bar.close()
    return scores


def _motion_scores(frames: torch.Tensor, flow: torch.Tensor, reference_flows: list[torch.Tensor], targets: Targets,
                   boxes: torch.Tensor | None) -> dict[str, float]:
    h, w = frames.shape[1:3]
    scores = {"flicker": metrics.flicker(frames, flow), "motion_smoothness": metrics.motion_smoothness(frames, flow),
              "dynamic_degree": metrics.dynamic_degree(flow)}
    if reference_flows:
        reference_degree = sum(metrics.dynamic_degree(f) for f in reference_flows) / len(reference_flows)
        scores["dynamic_degree_deviation"] = abs(scores["dynamic_degree"] - reference_degree)
        tracks = metrics.point_tracks(flow)
        scores["motion_fidelity"] = sum(metrics.motion_fidelity(tracks, (h, w), metrics.point_tracks(f), tuple(f.shape[-2:]))
                                        for f in reference_flows) / len(reference_flows)
    if targets.camera is not None:
        subject = None if boxes is None else cells_in_boxes(boxes[:-1], h, w)
        scores["camera_flow_error"] = metrics.camera_flow_error(flow, targets.camera, subject)
    if targets.boxes is not None:
        scores["box_flow_error"] = metrics.box_flow_error(flow, targets.boxes.per_frame(len(frames)))
    return scores
