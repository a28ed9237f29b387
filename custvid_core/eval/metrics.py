"""The papers' metrics of a customized video, as batched tensor functions.

Appearance (SMRABooth, DualReal, MotionBooth, SynMotion) works on unit-length features, one row per image:
CLIP-T (frames against the prompt), CLIP-I and DINO-I (frames against the subject's reference photos; DINO-I
uses DINOv2's CLS token), R-CLIP and R-DINO (the same on square crops around the subject's box or mask:
`region_crops`) and T.Cons (CLIP cosine of consecutive frames).

Motion works on frames `[F, H, W, 3]` in [0, 1] and their RAFT flow `[F-1, 2, H, W]` (frame t to t+1, pixels):
- temporal flicker (VBench): the mean absolute change of pixels between consecutive frames, over the static
  pixels of each pair, those RAFT sees moving less than half a pixel (VBench measures whole frames of clips
  prompted to stand still; here any clip's still parts are measured). 0 is steady, on a 0-1 scale.
- motion smoothness (VBench's idea, without its AMT interpolation model): each middle frame is predicted from
  its two neighbours moved half-way along the RAFT flow between them (constant velocity), and the score is
  1 - the mean absolute error of the prediction: 1 for a still clip and for a steady motion, lower for jerky
  motion.
- dynamic degree (VBench): per frame pair the mean of the top 5% flow magnitudes, in pixels of a frame whose
  shorter side is 256 (VBench's scale), averaged over the pairs.
- motion fidelity (Yatim et al., used by SMRABooth and SynMotion): point tracks of the generated and the
  reference clip compared by the cosine of their velocities. The papers track with CoTracker; here the tracks
  are RAFT's flow chained from a grid of points in the first frame (`point_tracks`).
- flow error (MotionBooth): the mean distance in pixels between RAFT's flow and the flow a commanded camera path
  gives the background (`camera_flow`), or between the subject's flow and its box path's displacement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..control.boxes import cells_in_boxes
from ..control.camera import CameraPath
from ..representations.motion import moving_region

STILL_PIXELS = 0.5  # a pixel moving less than this between two frames is static (flicker)
VBENCH_SIDE = 256  # dynamic degree is in pixels of a frame whose shorter side is this (VBench's scale)
TOP_SHARE = 0.05  # dynamic degree: the share of largest flow magnitudes averaged per pair


# --- appearance --------------------------------------------------------------------------------------
def mean_cosine(features: torch.Tensor, others: torch.Tensor) -> float:
    """Mean cosine of every row of `features` `[N, D]` with every row of `others` `[M, D]` (unit length):
    CLIP-T with the prompt's embedding, CLIP-I / DINO-I with the reference photos'."""
    return float((features @ others.T).mean())


def temporal_consistency(features: torch.Tensor) -> float:
    """T.Cons: the mean cosine of consecutive frames' unit-length features `[F, D]` (1 for a still clip)."""
    if len(features) < 2:
        return float("nan")
    return float((features[:-1] * features[1:]).sum(-1).mean())


def region_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Square crops `[N, size, size, 3]` of images `[N, H, W, 3]` around their boxes `[N, 4]` (normalised
    xyxy): each box widened to a square about its centre, so the subject keeps its proportions; what lies
    outside the frame is black. One `roi_align` call for the whole batch."""
    from torchvision.ops import roi_align

    n, h, w, _ = images.shape
    pixels = boxes.float() * torch.tensor([w, h, w, h], dtype=torch.float32)
    centre = (pixels[:, :2] + pixels[:, 2:]) / 2
    half = (pixels[:, 2:] - pixels[:, :2]).amax(1, keepdim=True) / 2
    square = torch.cat([centre - half, centre + half], 1)
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], square], 1).to(images.device)
    crops = roi_align(images.permute(0, 3, 1, 2).float(), rois, output_size=size, aligned=True)
    return crops.permute(0, 2, 3, 1).clamp(0, 1)


# --- motion ------------------------------------------------------------------------------------------
def flicker(frames: torch.Tensor, flow: torch.Tensor | None = None) -> float:
    """Mean absolute change between consecutive frames over their static pixels (flow below STILL_PIXELS);
    over whole frames without a flow. NaN when nothing stands still."""
    change = (frames[1:] - frames[:-1]).abs().mean(-1)
    if flow is None:
        return float(change.mean())
    still = flow.norm(dim=1) < STILL_PIXELS
    return float(change[still].mean()) if bool(still.any()) else float("nan")


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`images` `[N, C, H, W]` read at each pixel moved by `flow` `[N, 2, H, W]` (bilinear, edges repeated)."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                            torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    x = (xs + flow[:, 0]) / max(w - 1, 1) * 2 - 1
    y = (ys + flow[:, 1]) / max(h - 1, 1) * 2 - 1
    return F.grid_sample(images, torch.stack([x, y], -1), mode="bilinear", padding_mode="border", align_corners=True)


def motion_smoothness(frames: torch.Tensor, flow: torch.Tensor) -> float:
    """1 - the mean absolute error of every middle frame predicted from its neighbours moved half-way along
    the flow between them (the flow t-1 -> t+1 chained from the two RAFT flows). NaN under 3 frames."""
    if len(frames) < 3:
        return float("nan")
    x = frames.permute(0, 3, 1, 2).float()
    span = flow[:-1] + warp(flow[1:], flow[:-1])  # where a pixel of frame t-1 is two frames later
    predicted = (warp(x[:-2], -span / 2) + warp(x[2:], span / 2)) / 2
    return 1.0 - float((predicted - x[1:-1]).abs().mean())


def dynamic_degree(flow: torch.Tensor) -> float:
    """Mean over frame pairs of the mean of the top 5% flow magnitudes, in pixels of a 256-pixel shorter side."""
    h, w = flow.shape[-2:]
    magnitude = flow.norm(dim=1).flatten(1) * (VBENCH_SIDE / min(h, w))
    top = max(1, int(magnitude.shape[1] * TOP_SHARE))
    return float(magnitude.topk(top, dim=1).values.mean())


def point_tracks(flow: torch.Tensor, points_per_side: int = 16) -> torch.Tensor:
    """`[P, F, 2]` positions (x, y) in pixels of a grid of points of the first frame, carried from frame to
    frame by the flow read at each point (bilinear): RAFT's chained flow standing in for a point tracker."""
    n, _, h, w = flow.shape
    side = torch.arange(points_per_side, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(side * h / points_per_side - 0.5, side * w / points_per_side - 0.5, indexing="ij")
    position = torch.stack([xs.flatten(), ys.flatten()], -1).to(flow.device)
    scale = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=torch.float32, device=flow.device)
    tracks = [position]
    for t in range(n):
        where = (position / scale * 2 - 1).view(1, 1, -1, 2)
        step = F.grid_sample(flow[t:t + 1].float(), where, mode="bilinear", padding_mode="border",
                             align_corners=True)[0, :, 0].T
        position = position + step
        tracks.append(position)
    return torch.stack(tracks, 1)


def _velocities(tracks: torch.Tensor, size: tuple[int, int], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame velocities `[P, frames-1, 2]` of tracks in fractions of the frame, resampled to `frames`, and
    where each moves (at least STILL_PIXELS of its own frame: RAFT's noise on still content stays below)."""
    if tracks.shape[1] != frames:
        tracks = F.interpolate(tracks.permute(0, 2, 1), size=frames, mode="linear", align_corners=True).permute(0, 2, 1)
    steps = tracks[:, 1:] - tracks[:, :-1]
    h, w = size
    return steps / torch.tensor([w, h], dtype=steps.dtype, device=steps.device), steps.norm(dim=-1) >= STILL_PIXELS


def motion_fidelity(tracks: torch.Tensor, size: tuple[int, int], reference: torch.Tensor,
                    reference_size: tuple[int, int]) -> float:
    """Motion fidelity of tracks `[P, F, 2]` (pixels of a frame of `size` (H, W)) against a reference clip's.

    Two tracks correlate by the mean cosine of their velocities over the frames where either moves (frames
    where both stand still say nothing); the score is the mean of the best match of every generated track among
    the reference's and of every reference track among the generated (Yatim et al.). Clips of different
    lengths are compared on the shorter one's frames. 1 for identical motion; 1 when neither clip moves, 0 when
    only one does."""
    frames = min(tracks.shape[1], reference.shape[1])
    (a, moving_a), (b, moving_b) = _velocities(tracks, size, frames), _velocities(reference, reference_size, frames)
    if not bool(moving_a.any()) or not bool(moving_b.any()):
        return float(bool(moving_a.any()) == bool(moving_b.any()))
    a, b = a[moving_a.any(1)], b[moving_b.any(1)]  # tracks that never move (the still background) say nothing
    moving_a, moving_b = moving_a[moving_a.any(1)].float(), moving_b[moving_b.any(1)].float()
    unit_a = F.normalize(a, dim=-1) * moving_a[..., None]
    unit_b = F.normalize(b, dim=-1) * moving_b[..., None]
    agreement = unit_a.flatten(1) @ unit_b.flatten(1).T  # summed cosines over the frames both move
    either = moving_a.sum(1)[:, None] + moving_b.sum(1)[None] - moving_a @ moving_b.T
    correlation = agreement / either.clamp_min(1)
    return float((correlation.amax(1).mean() + correlation.amax(0).mean()) / 2)


def camera_flow(path: CameraPath, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """The flow `[frames-1, 2, H, W]` in pixels that a camera path gives a still background, with the
    camera control's conventions: content at u (a fraction of the frame) shows at `0.5 + zoom (u - 0.5) - pan`."""
    h, w = size
    view = path.per_frame(frames)  # [F, 3]: pan x, pan y, zoom, frame 0's view taken out
    ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float32) + 0.5) / h,
                            (torch.arange(w, dtype=torch.float32) + 0.5) / w, indexing="ij")
    p = torch.stack([xs, ys])[None]  # [1, 2, H, W]
    pan, zoom = view[:, :2, None, None], view[:, 2, None, None, None]
    content = 0.5 + (p - 0.5 + pan[:-1]) / zoom[:-1]
    shown = 0.5 + zoom[1:] * (content - 0.5) - pan[1:]
    return (shown - p) * torch.tensor([w, h], dtype=torch.float32).view(1, 2, 1, 1)


def camera_flow_error(flow: torch.Tensor, path: CameraPath, subject: torch.Tensor | None = None) -> float:
    """Mean distance in pixels between the flow and the camera path's, over the background: the pixels of each
    pair outside `subject` (`[F-1, H, W]` bool, e.g. its boxes) when given."""
    error = (flow - camera_flow(path, flow.shape[0] + 1, tuple(flow.shape[-2:])).to(flow.device)).norm(dim=1)
    if subject is None:
        return float(error.mean())
    background = ~subject.to(error.device)
    return float(error[background].mean()) if bool(background.any()) else float("nan")


def box_flow_error(flow: torch.Tensor, boxes: torch.Tensor) -> float:
    """Mean distance in pixels between the subject's motion and its box path's, per frame pair. The subject's
    motion is the mean flow of the pixels that move inside the pair's first box (above a quarter of the box's
    largest motion and half a pixel: the background inside a box stands still); the box path's is the move of
    the box's centre. `boxes` `[F, 4]` normalised xyxy per frame."""
    n, _, h, w = flow.shape
    inside = cells_in_boxes(boxes[:-1], h, w).to(flow.device)
    in_box = flow * inside[:, None]
    weights = moving_region(in_box) * inside
    subject = (in_box * weights[:, None]).sum((2, 3)) / weights.sum((1, 2)).clamp_min(1e-6)[:, None]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * torch.tensor([w, h], dtype=torch.float32)
    return float((subject - (centres[1:] - centres[:-1]).to(flow.device)).norm(dim=1).mean())
