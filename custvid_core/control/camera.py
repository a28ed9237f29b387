"""Training-free camera control by shifting the noisy latent between sampling steps (MotionBooth).

During a window of the schedule (by default steps 10 to 20 of 50), each latent frame is moved a
little further along the camera path after every step; frame 0 never moves and later frames move in
proportion to their time in the clip. The denoiser then paints the moved noise as moved content.
Cells that the move vacates are filled with cells drawn, without replacement, from the same row (or
column) outside every subject box, so the fill looks like background noise, not like the subject.

Beyond the authors' constant pan this takes a path of keyframes (pan and zoom over the clip's time)
and zoom about the frame's centre. Values are moved, never blended, so the noise keeps its statistics.

Conventions: pans are fractions of the frame over the whole clip; positive x pans the camera right
(content moves left), positive y pans down; zoom > 1 zooms in. The authors move frame f by
`f / F` of the pan (the last frame slightly less than the pan); here the last frame moves the full pan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .boxes import cells_in_boxes
from .sampling import SamplingControl, SamplingStep

MAX_ZOOM = 4.0


@dataclass(frozen=True)
class CameraKey:
    """Where the camera is at `at` (0 = first frame, 1 = last): pan (x, y) in frame fractions, zoom."""

    at: float
    x: float = 0.0
    y: float = 0.0
    zoom: float = 1.0


@dataclass(frozen=True)
class CameraPath:
    """Camera keyframes over the clip, linearly interpolated (zoom geometrically)."""

    keys: tuple[CameraKey, ...]

    def __post_init__(self):
        if not self.keys:
            raise InputError("camera", "no keyframes", "at least one keyframe")
        for key in self.keys:
            if not 0.0 <= key.at <= 1.0:
                raise InputError("camera", f"keyframe time {key.at}", "times between 0 (first frame) and 1 (last)")
            if not abs(key.x) <= 1.0 or not abs(key.y) <= 1.0:  # also refuses nan
                raise InputError("camera", f"a pan of ({key.x}, {key.y}) frames",
                                 "pans within one frame width/height (-1 to 1) over the clip")
            if not 1 / MAX_ZOOM <= key.zoom <= MAX_ZOOM:
                raise InputError("camera", f"zoom {key.zoom}", f"a zoom between {1 / MAX_ZOOM} and {MAX_ZOOM}")
        times = [k.at for k in self.keys]
        if times != sorted(times) or len(set(times)) != len(times):
            raise InputError("camera", f"keyframe times {times}", "increasing, distinct times")

    @classmethod
    def constant(cls, x: float = 0.0, y: float = 0.0, zoom: float = 1.0) -> CameraPath:
        """A steady pan/zoom: still at the first frame, (x, y, zoom) at the last."""
        return cls((CameraKey(0.0), CameraKey(1.0, x, y, zoom)))

    @classmethod
    def parse(cls, text: str) -> CameraPath:
        """Keyframes as JSON (`[{"at": 0.5, "x": 0.1, "y": 0, "zoom": 1.2}, ...]`) or lines `at: x, y[, zoom]`.
        A path without a keyframe at time 0 starts from the first frame's view."""
        text = text.strip()
        if not text:
            raise InputError("camera_path", "it is empty", "keyframes such as '1.0: 0.25, 0' (at: x, y[, zoom])")
        try:
            if text.startswith("["):
                keys = [CameraKey(float(k["at"]), float(k.get("x", 0)), float(k.get("y", 0)), float(k.get("zoom", 1)))
                        for k in json.loads(text)]
            else:
                keys = []
                for line in filter(None, (p.strip() for p in text.replace(";", "\n").splitlines())):
                    at, values = line.split(":")
                    numbers = [float(v) for v in values.split(",")]
                    if len(numbers) not in (2, 3):
                        raise ValueError(line)
                    keys.append(CameraKey(float(at), *numbers))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise InputError("camera_path", f"could not read '{text}' ({e})",
                             "lines 'at: x, y[, zoom]' (e.g. '0.5: 0.1, 0' then '1: 0.3, 0, 1.2') "
                             "or a JSON list of {at, x, y, zoom}") from None
        if keys and keys[0].at > 0:
            keys.insert(0, CameraKey(0.0))
        try:
            return cls(tuple(keys))
        except InputError as e:
            raise InputError("camera_path", e.problem, e.expected) from None

    def at(self, u: float) -> tuple[float, float, float]:
        """(x, y, zoom) at clip time u in [0, 1]."""
        keys = self.keys
        if u <= keys[0].at:
            k = keys[0]
            return k.x, k.y, k.zoom
        for a, b in zip(keys, keys[1:]):
            if u <= b.at:
                w = (u - a.at) / (b.at - a.at)
                return (a.x + w * (b.x - a.x), a.y + w * (b.y - a.y),
                        math.exp(math.log(a.zoom) + w * (math.log(b.zoom) - math.log(a.zoom))))
        k = keys[-1]
        return k.x, k.y, k.zoom

    def per_frame(self, frames: int) -> torch.Tensor:
        """`[frames, 3]` (x, y, zoom) of each frame, frames spread evenly over the clip's time, the first
        frame's view subtracted so frame 0 stays where it is."""
        times = [f / (frames - 1) for f in range(frames)] if frames > 1 else [0.0]
        x0, y0, z0 = self.at(0.0)
        return torch.tensor([[x - x0, y - y0, z / z0] for x, y, z in map(self.at, times)], dtype=torch.float32)


@dataclass(frozen=True)
class StepWindow:
    """Part of the sampling schedule, as fractions of its steps: [start, end)."""

    start: float = 0.2
    end: float = 0.4

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise InputError("window", f"start {self.start}, end {self.end}",
                             "0 <= start < end <= 1 (fractions of the sampling steps; MotionBooth: 0.2 to 0.4)")

    def steps(self, total: int) -> range:
        """The step indices in the window for a schedule of `total` steps (at least one step)."""
        first = min(total - 1, int(round(self.start * total)))
        return range(first, max(first + 1, int(round(self.end * total))))


def _content_map(path: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, the map from original content position u (normalised, centre 0.5) to where it is
    shown after `progress` of the shift: `0.5 + zoom * (u - 0.5) - pan`. Returns (zoom [F], pan [F, 2])."""
    zoom = path[:, 2] ** progress
    return zoom, path[:, :2] * progress


def move_boxes(boxes: torch.Tensor, path: torch.Tensor, progress: float) -> torch.Tensor:
    """Subject boxes `[F, N, 4]` (normalised xyxy per frame) as the content has moved; a new tensor."""
    zoom, pan = _content_map(path, progress)
    z, p = zoom[:, None, None], pan.repeat(1, 2)[:, None, :]
    return 0.5 + z * (boxes - 0.5) - p


def _fill_along_last(x: torch.Tensor, vacant: torch.Tensor, free: torch.Tensor, g: torch.Generator):
    """For each line (last dim of `vacant`/`free` `[N, L]`; `x` `[N, C, L]`), copy into its vacant cells
    the values of its free cells in random order, without replacement while there are enough free
    cells (then reusing them). Returns (x, the cells still vacant: lines without any free cell)."""
    keys = torch.rand(free.shape, generator=g).to(free.device).masked_fill(~free, 2.0)
    order = keys.argsort(-1)  # free cells first, shuffled
    count = free.sum(-1, keepdim=True)
    rank = vacant.long().cumsum(-1) - 1
    source = order.gather(-1, rank.clamp(min=0) % count.clamp(min=1))
    filled = vacant & (count > 0)
    values = x.gather(-1, source[:, None, :].expand_as(x))
    return torch.where(filled[:, None, :], values, x), vacant & ~filled


class LatentShift(SamplingControl):
    """Moves latent frames along a camera path during a window of the sampling steps (a control's `after_step`).

    `frames` is the latent's time axis (`[B, C, T, H, W]`); `steps` the schedule's step count. Subject boxes
    `[T, N, 4]` (normalised xyxy per latent frame) keep the fill away from the subject; they move with the
    content and are read back from `boxes` (the input is not changed).
    """

    def __init__(self, path: CameraPath, steps: int, frames: int, window: StepWindow = StepWindow(),
                 boxes: torch.Tensor | None = None, seed: int = 0):
        self.path = path.per_frame(frames)
        self.steps = steps
        self.window = list(window.steps(steps))
        self.seed = seed
        self.start_boxes = None if boxes is None else boxes.detach().float().cpu().clone()
        if self.start_boxes is not None and (self.start_boxes.ndim != 3 or self.start_boxes.shape[0] != frames
                                             or self.start_boxes.shape[-1] != 4):
            raise InputError("boxes", f"shape {tuple(boxes.shape)}", f"[{frames} latent frames, boxes, 4] (xyxy)")
        self.boxes = self.start_boxes

    def moved(self, index: int) -> float:
        """How much of the camera move is done after step `index` (0 before the window, 1 after it)."""
        if index < self.window[0]:
            return 0.0
        return min(1.0, (index - self.window[0] + 1) / len(self.window))

    def segments(self, steps: int) -> list[tuple[int, int]]:
        """Step ranges [start, end) to run a sampler over so that every window step ends one: a host
        sampler that cannot be stopped between steps runs range by range, with `after_step` of step `end - 1`."""
        bounds = sorted({0, steps, *self.window, *(s + 1 for s in self.window)} & set(range(steps + 1)))
        return list(zip(bounds, bounds[1:]))

    def after_step(self, step: SamplingStep, x: torch.Tensor) -> torch.Tensor:
        if step.count != self.steps:
            raise InputError("steps", f"a schedule of {step.count} steps", f"the {self.steps} the camera was made for")
        if step.index not in self.window:
            return x
        before, after = self.moved(step.index - 1), self.moved(step.index)
        moved = self._move(x, before, after, step.index)
        if self.start_boxes is not None:
            self.boxes = move_boxes(self.start_boxes, self.path, after)
        return moved

    def _move(self, x: torch.Tensor, before: float, after: float, step: int) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if t != self.path.shape[0]:
            raise InputError("latent", f"{t} latent frames", f"the {self.path.shape[0]} the camera path was made for")
        source_y, source_x = self._sources(h, w, before, after)  # [T, H, W] integer cells, may be outside
        inside = (source_x >= 0) & (source_x < w) & (source_y >= 0) & (source_y < h)
        flat = (source_y.clamp(0, h - 1) * w + source_x.clamp(0, w - 1)).view(1, 1, t, h * w)
        x = x.reshape(b, c, t, h * w).gather(-1, flat.expand(b, c, t, h * w).to(x.device)).view(b, c, t, h, w)
        vacant = ~inside
        if not bool(vacant.any()):
            return x
        free = inside.clone()
        if self.start_boxes is not None:
            moved_boxes = move_boxes(self.start_boxes, self.path, after)
            free &= ~cells_in_boxes(moved_boxes.reshape(-1, 4), h, w).view(t, -1, h, w).any(1)
        return self._fill(x, vacant, free, step)

    def _sources(self, h: int, w: int, before: float, after: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The cell each cell's new value comes from, per frame (may lie outside: vacated).

        In cell units, content from original cell c is shown after progress p at
        `R(centre + zoom_p * (c - centre)) - R(pan_p)` with R rounding half up. The zoom and the pan
        are rounded apart so that pans in whole and fractional cells are exact and accumulate: the
        source is where the content the cell must show after the step was shown before it."""
        def r(v):
            return torch.floor(v + 0.5)

        zoom_a, pan_a = _content_map(self.path, after)
        zoom_b, pan_b = _content_map(self.path, before)
        out = []
        for size, axis in ((h, 1), (w, 0)):
            cells = torch.arange(size, dtype=torch.float32)[None]
            centre = (size - 1) / 2
            shift_a, shift_b = r(pan_a[:, axis, None] * size), r(pan_b[:, axis, None] * size)
            origin = r(centre + (cells + shift_a - centre) / zoom_a[:, None])
            out.append((r(centre + zoom_b[:, None] * (origin - centre)) - shift_b).long())  # [T, size]
        rows, cols = out
        t = self.path.shape[0]
        return rows[:, :, None].expand(t, h, w), cols[:, None, :].expand(t, h, w)

    def _fill(self, x: torch.Tensor, vacant: torch.Tensor, free: torch.Tensor, step: int) -> torch.Tensor:
        """Vacant cells take values from free cells of the same row, else the same column, else anywhere
        in the frame; all channels together; deterministic by seed and step."""
        b, c, t, h, w = x.shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        vacant, free = vacant[None].expand(b, t, h, w).to(x.device), free[None].expand(b, t, h, w).to(x.device)
        # rows
        lines = x.permute(0, 2, 3, 1, 4).reshape(b * t * h, c, w)
        lines, left = _fill_along_last(lines, vacant.reshape(-1, w), free.reshape(-1, w), g)
        x = lines.view(b, t, h, c, w).permute(0, 3, 1, 2, 4)
        left = left.view(b, t, h, w)
        if bool(left.any()):  # columns
            lines = x.permute(0, 2, 4, 1, 3).reshape(b * t * w, c, h)
            free_cols = (free & ~left).transpose(-1, -2).reshape(-1, h)
            lines, left = _fill_along_last(lines, left.transpose(-1, -2).reshape(-1, h), free_cols, g)
            x = lines.view(b, t, w, c, h).permute(0, 3, 1, 4, 2)
            left = left.view(b, t, w, h).transpose(-1, -2)
        if bool(left.any()):  # whole frame
            lines = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h * w)
            lines, _ = _fill_along_last(lines, left.reshape(b * t, -1), (free & ~left).reshape(b * t, -1), g)
            x = lines.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x.contiguous()
