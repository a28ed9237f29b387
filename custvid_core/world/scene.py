"""The shapes world: synthetic clips of coloured, textured shapes with exact ground truth.

A clip shows one object (a colour, a shape, a texture) moving along a path over a textured
wallpaper that a camera may pan across. Everything is computed, so every clip knows its masks,
boxes, centroids and background offset exactly; that is what makes the world a yardstick.
Rendering is deterministic for a given `Scene`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..errors import InputError
from ..images import mask_boxes

# name -> RGB. The first six are the pretraining vocabulary; the rest are held out for customization.
COLOURS = {
    "red": (0.90, 0.15, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10), "magenta": (0.90, 0.20, 0.85), "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05), "white": (0.95, 0.95, 0.95), "purple": (0.50, 0.15, 0.75),
}
SEEN_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "heart")
SEEN_SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "dotted", "checkered")
SEEN_TEXTURES = ("plain", "striped")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# Paths beyond straight lines, for customization cases (never in pretraining).
PATHS = ("straight", "circle", "zigzag", "bounce", "keyframes")


@dataclass(frozen=True)
class WorldSpec:
    """Clip geometry shared by the generator, the model and the measurements."""

    size: int = 32
    frames: int = 5
    # Side of the object's box, pixels: at 16 to 19 the model's 2x2-pixel tokens leave room for corners and
    # arms (at 10 to 13 it drew most shapes as blobs).
    object_size: tuple[float, float] = (16.0, 19.0)
    # Straight motions, pixels per frame: fast enough that an object crosses most of the frame,
    # so direction is the dominant trait of a clip rather than a sub-token drift.
    speed: tuple[float, float] = (2.5, 3.2)
    # Amplitude of each of the wallpaper's three waves: the background's contrast, which is what a camera
    # pan is seen by.
    wallpaper_contrast: float = 0.035


@dataclass
class Scene:
    """Everything needed to render one clip. Positions are in pixels; paths are functions of time."""

    colour: str = "red"
    shape: str = "circle"
    texture: str = "plain"
    path: str = "straight"
    direction: str = "right"  # for straight paths
    start: tuple[float, float] = (10.0, 16.0)  # object centre at frame 0
    speed: float = 1.5  # straight paths: pixels per frame
    object_size: float = 17.0
    background_offset: tuple[float, float] = (0.0, 0.0)  # wallpaper offset at frame 0
    background_seed: int = 0  # which wallpaper
    camera: tuple[float, float] = (0.0, 0.0)  # pan in pixels per frame (+x: camera moves right)
    path_params: dict = field(default_factory=dict)  # circle: radius, turns; zigzag: amplitude, period...

    def prompt(self) -> str:
        words = [self.colour] + ([self.texture] if self.texture != "plain" else []) + [self.shape]
        if self.path == "straight":
            words += ["moving", self.direction]
        return " ".join(words)


@dataclass
class Clip:
    """A rendered clip and its ground truth.

    frames: [F, H, W, 3] in [0, 1]; masks: [F, H, W] in {0, 1}; boxes: [F, 4] normalised xyxy;
    centroids: [F, 2] normalised (x, y) of the mask; background_offsets: [F, 2] pixels.
    """

    frames: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    centroids: torch.Tensor
    centres: torch.Tensor  # [F, 2] pixels: where the path put the object
    background_offsets: torch.Tensor
    scene: Scene

    @property
    def prompt(self) -> str:
        return self.scene.prompt()


def validate_scene(scene: Scene) -> None:
    for name, value, allowed in (("colour", scene.colour, COLOURS), ("shape", scene.shape, SHAPES),
                                 ("texture", scene.texture, TEXTURES), ("path", scene.path, PATHS),
                                 ("direction", scene.direction, DIRECTIONS)):
        if value not in allowed:
            raise InputError(name, f"'{value}' is not in the shapes world", f"one of {', '.join(allowed)}")


def path_centres(scene: Scene, frames: int, size: int) -> torch.Tensor:
    """[F, 2] object centres in pixels along the scene's path."""
    t = torch.arange(frames, dtype=torch.float32)
    x0, y0 = scene.start
    p = scene.path_params
    if scene.path == "straight":
        dx, dy = DIRECTIONS[scene.direction]
        return torch.stack([x0 + dx * scene.speed * t, y0 + dy * scene.speed * t], 1)
    u = t / max(1, frames - 1)  # 0 .. 1 over the clip
    if scene.path == "circle":  # starts at `start`, goes around `center`
        cx, cy = p.get("center", (size / 2, size / 2))
        r = math.hypot(x0 - cx, y0 - cy)
        a0 = math.atan2(y0 - cy, x0 - cx)
        a = a0 + 2 * math.pi * p.get("turns", 1.0) * u * (1 if p.get("clockwise", True) else -1)
        return torch.stack([cx + r * torch.cos(a), cy + r * torch.sin(a)], 1)
    if scene.path == "zigzag":  # along `direction`, alternating sideways
        dx, dy = DIRECTIONS[scene.direction]
        along = scene.speed * t
        zig = p.get("amplitude", 4.0) * (2 * torch.abs(2 * ((u * p.get("zigs", 2.0)) % 1.0) - 1) - 1)
        return torch.stack([x0 + dx * along - dy * zig, y0 + dy * along + dx * zig], 1)
    if scene.path == "bounce":  # diagonal velocity, reflected at the frame's edges
        vx, vy = p.get("velocity", (2.5, 1.5))
        half = scene.object_size / 2
        lo, hi = half, size - half

        def reflect(start, v):
            span = hi - lo
            pos = (start - lo + v * t) % (2 * span)
            return lo + torch.where(pos > span, 2 * span - pos, pos)

        return torch.stack([reflect(x0, vx), reflect(y0, vy)], 1)
    if scene.path == "keyframes":  # piecewise linear through normalised (x, y) points
        points = torch.tensor(p["points"], dtype=torch.float32) * size
        pos = u * (len(points) - 1)
        i = pos.floor().long().clamp(max=len(points) - 2)
        w = (pos - i)[:, None]
        return points[i] * (1 - w) + points[i + 1] * w
    raise InputError("path", f"'{scene.path}' is not a path", f"one of {PATHS}")


def _shape_coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, half: float) -> torch.Tensor:
    """Inside-test of a shape centred at 0 with box half-side `half`, on offsets (dx, dy)."""
    ax, ay = dx.abs(), dy.abs()
    r = torch.sqrt(dx ** 2 + dy ** 2)
    if shape == "circle":
        return r <= half
    if shape == "square":
        return (ax <= half * 0.9) & (ay <= half * 0.9)
    if shape == "triangle":  # pointing up
        return (dy <= half * 0.85) & (dy >= -half) & (ax <= (dy + half) * 0.5 * 0.95)
    if shape == "cross":
        arm = half * 0.38
        return ((ax <= arm) & (ay <= half)) | ((ay <= arm) & (ax <= half))
    if shape == "diamond":
        return ax + ay <= half
    if shape == "ring":
        return (r <= half) & (r >= half * 0.5)
    if shape == "star":  # five points
        a = torch.atan2(dy, dx) + math.pi / 2
        k = torch.cos(5 * a) * 0.5 + 0.5
        return r <= half * (0.45 + 0.55 * k ** 2)
    if shape == "heart":
        x, y = dx / half * 1.15, -dy / half * 1.15 + 0.25
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    raise InputError("shape", f"'{shape}' is not a shape", f"one of {SHAPES}")


def _texture_factor(texture: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Brightness multiplier of the texture, anchored to the object (it moves with it)."""
    if texture == "plain":
        return torch.ones_like(dx)
    if texture == "striped":  # diagonal bands, period 4 px
        return torch.where(((dx + dy) / 4).floor() % 2 == 0, 1.0, 0.45)
    if texture == "dotted":
        fx, fy = (dx / 4) % 1 - 0.5, (dy / 4) % 1 - 0.5
        return torch.where(fx ** 2 + fy ** 2 < 0.09, 0.35, 1.0)
    if texture == "checkered":
        return torch.where(((dx / 3).floor() + (dy / 3).floor()) % 2 == 0, 1.0, 0.5)
    raise InputError("texture", f"'{texture}' is not a texture", f"one of {TEXTURES}")


def wallpaper(x: torch.Tensor, y: torch.Tensor, seed: int = 0, contrast: float = 0.035) -> torch.Tensor:
    """The background at (possibly fractional) pixel coordinates: a dim bluish-grey field of three
    gentle waves (periods 10 to 20 px) whose directions and phases come from `seed`.

    Smooth, so a small model renders it easily; two-dimensional structure, so a camera pan is
    measurable from it; unsaturated, so objects stand out by colour.
    """
    g = torch.Generator().manual_seed(int(seed))
    v = torch.zeros_like(x)
    for _ in range(3):
        period = 10 + 10 * float(torch.rand((), generator=g))
        angle = math.pi * float(torch.rand((), generator=g))
        phase = 2 * math.pi * float(torch.rand((), generator=g))
        k = 2 * math.pi / period
        v = v + torch.sin(k * (x * math.cos(angle) + y * math.sin(angle)) + phase)
    base = 0.22 + contrast * v
    return torch.stack([base * 0.95, base * 1.0, base * 1.15], -1).clamp(0, 1)


def render(scene: Scene, spec: WorldSpec = WorldSpec(), supersample: int = 4) -> Clip:
    """Render a scene; edges are anti-aliased by supersampling, masks are coverage > 0.5."""
    validate_scene(scene)
    s, n = spec.size, spec.frames
    ss = supersample
    coords = (torch.arange(s * ss, dtype=torch.float32) + 0.5) / ss  # pixel-space sample positions
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = path_centres(scene, n, s)
    colour = torch.tensor(COLOURS[scene.colour])
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    bg = wallpaper(xx + scene.background_offset[0] + scene.camera[0] * t,
                   yy + scene.background_offset[1] + scene.camera[1] * t, scene.background_seed,
                   spec.wallpaper_contrast)
    dx, dy = xx - centres[:, 0].view(n, 1, 1), yy - centres[:, 1].view(n, 1, 1)
    inside = _shape_coverage(scene.shape, dx, dy, scene.object_size / 2).float()[..., None]
    obj = colour * _texture_factor(scene.texture, dx, dy)[..., None]
    img = bg * (1 - inside) + obj * inside
    frames = img.view(n, s, ss, s, ss, 3).mean((2, 4))
    masks = (inside.view(n, s, ss, s, ss).mean((2, 4)) > 0.5).float()
    offsets = torch.tensor([[scene.background_offset[0] + scene.camera[0] * f,
                             scene.background_offset[1] + scene.camera[1] * f] for f in range(n)])
    return Clip(frames=frames, masks=masks, boxes=mask_boxes(masks), centroids=mask_centroids(masks),
                centres=centres, background_offsets=offsets, scene=scene)


def mask_centroids(masks: torch.Tensor) -> torch.Tensor:
    """[F, H, W] -> [F, 2] normalised (x, y) centroids (NaN where a mask is empty)."""
    f, h, w = masks.shape
    total = masks.sum((1, 2))
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    cx = (masks.sum(1) * xs).sum(1) / total
    cy = (masks.sum(2) * ys).sum(1) / total
    return torch.stack([cx, cy], 1)


def random_scene(generator: torch.Generator, spec: WorldSpec = WorldSpec(), colours: Sequence[str] = SEEN_COLOURS,
                 shapes: Sequence[str] = SEEN_SHAPES, textures: Sequence[str] = SEEN_TEXTURES,
                 directions: Sequence[str] = tuple(DIRECTIONS), camera_speed: float = 0.0,
                 centred_jitter: float | None = None) -> Scene:
    """A pretraining scene: a straight motion at random speed, with a start that keeps the object in frame.

    With `centred_jitter`, the path's midpoint is the frame's centre moved by at most that many pixels on
    each axis, so the prompt fixes the layout up to the jitter (easier to learn); otherwise the start is
    anywhere that keeps the whole path in frame.
    """

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    size = uniform(*spec.object_size)
    speed = uniform(*spec.speed)
    direction = pick(list(directions))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (spec.frames - 1)
    half = size / 2
    lo, hi = half, spec.size - half

    def start_along(d):  # the start that leaves room for the whole travel
        if centred_jitter is not None:
            return spec.size / 2 - d * travel / 2 + uniform(-centred_jitter, centred_jitter)
        if d > 0:
            return uniform(lo, max(lo, hi - travel))
        if d < 0:
            return uniform(min(hi, lo + travel), hi)
        return uniform(lo, hi)

    camera = (0.0, 0.0)
    if camera_speed:
        angle = uniform(0, 2 * math.pi)
        camera = (camera_speed * math.cos(angle), camera_speed * math.sin(angle))
    return Scene(colour=pick(list(colours)), shape=pick(list(shapes)), texture=pick(list(textures)),
                 direction=direction, start=(start_along(dx), start_along(dy)), speed=speed,
                 object_size=size, background_offset=(uniform(0, 64), uniform(0, 64)), camera=camera,
                 background_seed=int(torch.randint(2 ** 31 - 1, (1,), generator=generator)))


def scene_from_dict(data: dict) -> Scene:
    """A Scene from plain data (case files); unknown keys are refused by name."""
    names = {f for f in Scene.__dataclass_fields__}
    unknown = set(data) - names
    if unknown:
        raise InputError(sorted(unknown)[0], "is not a scene field", f"fields among {', '.join(sorted(names))}")
    data = dict(data)
    for key in ("start", "background_offset", "camera"):
        if key in data:
            data[key] = tuple(data[key])
    scene = Scene(**data)
    validate_scene(scene)
    return scene


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)
