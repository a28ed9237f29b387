"""Measurements on generated clips with analytic answers in the shapes world.

The world's background is dim and unsaturated and its objects are saturated or bright, so the
main object is found by colour; everything else (identity, path, pan, box adherence, flicker)
follows from its mask and from the background. Clips are `[F, H, W, 3]` in [0, 1]; positions
are fractions of the frame (x right, y down).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scene import COLOURS, DIRECTIONS, SHAPES, Scene, WorldSpec, render

NORMALISED_SIDE = 16  # masks and textures are compared on this grid after cropping to the object
# Largest distance of a pixel's hue (`hue_of`) from the object's for the pixel to belong to it: a third to a
# half of the way from a saturated world colour to the background's hue, so edge pixels mostly count and
# dots of another colour do not.
HUE_TOLERANCE = 0.35


# --- finding the object --------------------------------------------------------------------------
def object_pixels(frames: torch.Tensor) -> torch.Tensor:
    """[F, H, W] candidate object pixels: saturated and not dark, or bright."""
    mx, mn = frames.max(-1).values, frames.min(-1).values
    saturation = (mx - mn) / mx.clamp_min(1e-6)
    return ((saturation > 0.4) & (mx > 0.25)) | (mx > 0.55)


def _max_3x3(mask: torch.Tensor) -> torch.Tensor:
    """[..., H, W] -> the largest value in each pixel's 3x3 neighbourhood, as float."""
    m = mask.float()
    return F.max_pool2d(m.reshape(-1, 1, *m.shape[-2:]), 3, 1, 1).reshape(m.shape)


def grown(mask: torch.Tensor) -> torch.Tensor:
    """[..., H, W] -> bool mask of the pixels within 1 px (8-connected) of the mask."""
    return _max_3x3(mask) > 0.5


def interior(mask: torch.Tensor) -> torch.Tensor:
    """[..., H, W] -> the mask without its 1-pixel rim, where edges blend with the background (float)."""
    return -_max_3x3(-mask.float())


def opening(mask: torch.Tensor) -> torch.Tensor:
    """[..., H, W] bool -> the mask without the parts a 3x3 square does not fit in (1-2 px lines and dots)."""
    return grown(interior(mask) > 0.5)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """[F, H, W] bool -> the largest 8-connected component of each frame (label propagation)."""
    f, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(f, h, w).clone()
    labels = labels * mask
    for _ in range(h + w):
        spread = _max_3x3(labels) * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    out = torch.zeros_like(mask)
    for i in range(f):
        ids, counts = labels[i][mask[i]].unique(return_counts=True)
        if len(ids):
            out[i] = labels[i] == ids[counts.argmax()]
    return out


def track(frames: torch.Tensor, min_pixels: int = 4) -> torch.Tensor:
    """[F, H, W] float mask of the main object per frame (empty where it is too small to count).

    A generated clip can have dotted 1-2 px lines of saturated pixels along patch edges, touching the
    object and changing its outline. They are removed twice: by hue (they are mostly of other hues
    than the object; a texture only darkens it) and by an opening, whose cut is then given back where
    it lies within 1 px of what is left (the tips of stars and triangles). A frame where the opening
    removes most of the object (a thin one, or one whose dark texture is not counted, like a textured
    white one) keeps its unopened mask."""
    pixels = object_pixels(frames)
    first = largest_component(pixels)
    for i in range(len(frames)):
        pixels[i] &= (hue_of(frames[i]) - object_colour(frames[i], first[i])).norm(dim=-1) < HUE_TOLERANCE
    mask, unopened = largest_component(opening(pixels)), largest_component(pixels)
    thin = mask.sum((1, 2)) < 0.5 * unopened.sum((1, 2))
    mask[thin] = unopened[thin]
    mask |= unopened & grown(mask)
    mask[mask.sum((1, 2)) < min_pixels] = False
    return mask.float()


def centroids(masks: torch.Tensor) -> torch.Tensor:
    """[F, H, W] -> [F, 2] normalised centroids; NaN where a frame has no object."""
    f, h, w = masks.shape
    total = masks.sum((1, 2))
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    c = torch.stack([(masks.sum(1) * xs).sum(1), (masks.sum(2) * ys).sum(1)], 1) / total[:, None]
    c[total == 0] = float("nan")
    return c


# --- identity -----------------------------------------------------------------------------------
def object_colour(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The object's hue as RGB scaled to a maximum of 1, from its brightest quarter of pixels
    (textures and anti-aliased edges only darken a colour)."""
    pixels = frames[masks > 0.5]
    if len(pixels) == 0:
        return torch.full((3,), float("nan"))
    bright = pixels.max(-1).values
    return hue_of(pixels[bright >= bright.quantile(0.75)].mean(0))


def hue_of(rgb: torch.Tensor) -> torch.Tensor:
    """RGB scaled to a maximum of 1 (what a texture or shading leaves unchanged)."""
    return rgb / rgb.max(-1, keepdim=True).values.clamp_min(1e-6)


def nearest_colour(rgb: torch.Tensor, names=tuple(COLOURS)) -> str | None:
    """The world colour nearest to a hue from `object_colour`."""
    if torch.isnan(rgb).any():
        return None
    table = hue_of(torch.tensor([COLOURS[n] for n in names]))
    return names[int((table - rgb).norm(dim=1).argmin())]


def _normalise(mask: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Crop to the mask's box and resize to NORMALISED_SIDE (position and scale removed)."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(xs) == 0:
        return torch.zeros(NORMALISED_SIDE, NORMALISED_SIDE)
    crop = (mask if values is None else values)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return F.interpolate(crop[None, None].float(), size=(NORMALISED_SIDE, NORMALISED_SIDE), mode="bilinear",
                         align_corners=False)[0, 0]


def shape_iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """IoU of two object masks after normalising position and scale."""
    a, b = _normalise(mask_a) > 0.5, _normalise(mask_b) > 0.5
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


_TEMPLATES: dict[str, list[torch.Tensor]] = {}


def _templates(shape: str) -> list[torch.Tensor]:
    """Tracked masks of a plain white `shape` at the sizes and sub-pixel positions world objects
    have (11 to 19 pixels): at these sizes the pixel grid changes a shape's outline as much as its kind does."""
    if shape not in _TEMPLATES:
        masks = []
        for size in (11.0, 12.5, 14.0, 15.5, 17.0, 18.5):
            for offset in ((0.0, 0.0), (0.5, 0.25), (0.25, 0.5)):
                clip = render(Scene(colour="white", shape=shape, start=(16 + offset[0], 16 + offset[1]),
                                    object_size=size), WorldSpec(frames=1))
                masks.append(track(clip.frames)[0])
        _TEMPLATES[shape] = masks
    return _TEMPLATES[shape]


def classify_shape(mask: torch.Tensor, shapes=SHAPES) -> tuple[str | None, float]:
    """The shape whose templates overlap the mask most (position and scale normalised), and that IoU."""
    if mask.sum() == 0:
        return None, 0.0
    scores = {s: max(shape_iou(mask, t) for t in _templates(s)) for s in shapes}
    best = max(scores, key=scores.get)
    return best, scores[best]


def texture_signature(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Brightness inside the object relative to its brightest pixels, on the normalised grid."""
    bright = frames.max(-1).values
    inside = bright[masks > 0.5]
    if len(inside) == 0:
        return torch.zeros(NORMALISED_SIDE, NORMALISED_SIDE)
    return _normalise(masks, bright / inside.quantile(0.9).clamp_min(1e-6) * masks)


def texture_contrast(frames: torch.Tensor, masks: torch.Tensor) -> float:
    """Share of the object's inner pixels clearly darker than its bright parts (about 0 for plain
    objects, 0.3 to 0.6 for textured ones)."""
    inner = interior(masks)
    bright = frames.max(-1).values[(inner if inner.sum() >= 4 else masks) > 0.5]
    if len(bright) == 0:
        return float("nan")
    return float((bright < 0.7 * bright.quantile(0.9)).float().mean())


def texture_correlation(frame_a, mask_a, frame_b, mask_b) -> float:
    """Pearson correlation of the two objects' normalised brightness patterns (1 = same texture)."""
    a = texture_signature(frame_a, mask_a).flatten()
    b = texture_signature(frame_b, mask_b).flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 1e-6 else (1.0 if a.norm() < 1e-3 and b.norm() < 1e-3 else 0.0)


# --- motion -------------------------------------------------------------------------------------
def direction_of(trajectory: torch.Tensor, min_travel: float = 0.05) -> str | None:
    """The straight direction (left/right/up/down) of the net displacement, or None if too small."""
    valid = trajectory[~torch.isnan(trajectory).any(1)]
    if len(valid) < 2:
        return None
    d = valid[-1] - valid[0]
    if float(d.norm()) < min_travel:
        return None
    vec = torch.tensor(list(DIRECTIONS.values()))
    return list(DIRECTIONS)[int((vec @ d).argmax())]


@dataclass
class PathError:
    mean_distance: float  # mean |trajectory - target| over frames, fraction of the frame
    shape_distance: float  # the same after removing each path's mean (translation-free shape)
    direction_cosine: float  # mean cosine between frame-to-frame steps (1: moving the target's way)
    speed_ratio: float  # path length / target path length


def path_error(trajectory: torch.Tensor, target: torch.Tensor) -> PathError:
    ok = ~torch.isnan(trajectory).any(1)
    if ok.sum() < 2:
        return PathError(float("nan"), float("nan"), float("nan"), float("nan"))
    tr, tg = trajectory[ok], target[ok]
    mean_d = float((tr - tg).norm(dim=1).mean())
    shape_d = float(((tr - tr.mean(0)) - (tg - tg.mean(0))).norm(dim=1).mean())
    da, db = tr[1:] - tr[:-1], tg[1:] - tg[:-1]
    cos = float(((da * db).sum(1) / (da.norm(dim=1) * db.norm(dim=1)).clamp_min(1e-6)).mean())
    length = lambda p: float((p[1:] - p[:-1]).norm(dim=1).sum())  # noqa: E731
    return PathError(mean_d, shape_d, cos, length(tr) / max(length(tg), 1e-6))


# --- camera, boxes, flicker ---------------------------------------------------------------------
def _shifted(image: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """image sampled at (x - dx, y - dy), bilinear, NaN outside: the image moved by (dx, dy)."""
    h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs - dx) / (w - 1) * 2 - 1, (ys - dy) / (h - 1) * 2 - 1], -1)[None]
    out = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    inside = F.grid_sample(torch.ones(1, 1, h, w), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return torch.where(inside > 0, out, torch.full_like(out, float("nan")))


def _trimmed(residuals: torch.Tensor, keep: float) -> torch.Tensor:
    """The `keep` fraction of residuals with the smallest magnitude (the rest treated as outliers)."""
    if keep >= 1.0 or len(residuals) < 8:
        return torch.ones_like(residuals, dtype=torch.bool)
    return residuals.abs() <= torch.quantile(residuals.abs(), keep)


def background_shift(a: torch.Tensor, b: torch.Tensor, valid_a: torch.Tensor, valid_b: torch.Tensor,
                     max_shift: int = 6, iterations: int = 10, trim: float = 0.8) -> tuple[float, float]:
    """How far the background content moved from greyscale frame `a` to `b`, in pixels (x, y).

    An exhaustive integer search of the masked squared difference, then Gauss-Newton refinement
    to sub-pixel precision. Pixels of the object in either frame are left out: on small frames
    a moving object otherwise pulls a correlation peak towards its own motion. Both stages are
    trimmed: only the `trim` fraction of pixels that match best count, so content that does not
    follow the pan (the strip a camera shift fills, newly revealed wallpaper) does not pull the estimate.
    """
    best, best_err = (0.0, 0.0), float("inf")
    need = 0.25 * float(valid_b.sum())
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            moved = _shifted(a, dx, dy)
            keep = valid_b & (_shifted(valid_a.float(), dx, dy) > 0.99) & ~torch.isnan(moved)
            if keep.sum() < need:
                continue
            r = (b - moved)[keep]
            err = float((r[_trimmed(r, trim)] ** 2).mean())
            if err < best_err:
                best, best_err = (float(dx), float(dy)), err
    dx, dy = best
    gy, gx = torch.gradient(a)
    for _ in range(iterations):
        moved, mgx, mgy = _shifted(a, dx, dy), _shifted(gx, dx, dy), _shifted(gy, dx, dy)
        keep = valid_b & (_shifted(valid_a.float(), dx, dy) > 0.99) & ~torch.isnan(moved)
        r = (b - moved)[keep]
        if len(r) <= 8:
            break
        inliers = _trimmed(r, trim)
        r = r[inliers]
        jac = torch.stack([mgx[keep][inliers], mgy[keep][inliers]], 1)  # moving `a` further adds its gradient
        step = torch.linalg.lstsq(jac, r[:, None]).solution[:, 0]
        dx, dy = dx - float(step[0]), dy - float(step[1])
        if float(step.norm()) < 1e-3:
            break
    return dx, dy


def camera_pan(frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """[F, 2] cumulative camera motion in pixels (x right, y down), measured on the background.

    Content moving left means the camera moved right.
    """
    grey = frames.mean(-1)
    valid = torch.ones_like(grey, dtype=torch.bool) if masks is None else masks < 0.5
    steps = [torch.zeros(2)]
    for i in range(len(frames) - 1):
        dx, dy = background_shift(grey[i], grey[i + 1], valid[i], valid[i + 1])
        steps.append(torch.tensor([-dx, -dy]))
    return torch.cumsum(torch.stack(steps), 0)


def box_adherence(trajectory: torch.Tensor, boxes: torch.Tensor) -> float:
    """Fraction of frames whose object centroid lies in that frame's box (normalised xyxy)."""
    x, y = trajectory[:, 0], trajectory[:, 1]
    inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])
    return float(inside.float().mean())


def flicker(frames: torch.Tensor, masks: torch.Tensor | None = None) -> float:
    """Mean absolute change of background pixels between consecutive frames (0 = steady).
    Pixels within one pixel of the object in either frame are left out."""
    diff = (frames[1:] - frames[:-1]).abs().mean(-1)
    if masks is not None:
        near = grown(masks)
        still = ~near[1:] & ~near[:-1]
        return float(diff[still].mean()) if still.any() else float("nan")
    return float(diff.mean())


# --- one summary per clip -------------------------------------------------------------------------
@dataclass
class ClipReport:
    colour: str | None
    shape: str | None
    shape_score: float
    direction: str | None
    texture_contrast: float
    present_frames: float  # fraction of frames where an object was found
    trajectory: torch.Tensor
    masks: torch.Tensor


def describe_clip(frames: torch.Tensor, shapes=SHAPES) -> ClipReport:
    masks = track(frames)
    trajectory = centroids(masks)
    middle = int(masks.sum((1, 2)).argmax())
    colour = nearest_colour(object_colour(frames, masks))
    shape, score = classify_shape(masks[middle], shapes)
    return ClipReport(colour, shape, score, direction_of(trajectory),
                      texture_contrast(frames[middle], masks[middle]),
                      float((masks.sum((1, 2)) > 0).float().mean()), trajectory, masks)
