"""Writing frames to image and video files (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .files import atomic_path


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> uint8 array."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def contact_sheet(frames: torch.Tensor, columns: int = 8, scale: int = 1, gap: int = 2) -> torch.Tensor:
    """Tile frames `[N, H, W, 3]` into one image `[H', W', 3]` (white gaps), optionally enlarged."""
    if scale > 1:
        frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    n, h, w, c = frames.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    sheet = torch.ones(rows * (h + gap) - gap, columns * (w + gap) - gap, c)
    for i, frame in enumerate(frames):
        r, col = divmod(i, columns)
        sheet[r * (h + gap): r * (h + gap) + h, col * (w + gap): col * (w + gap) + w] = frame
    return sheet


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image[None])[0]).save(tmp, format="PNG")
    return Path(path)


def save_gif(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8, scale: int = 1) -> Path:
    from PIL import Image

    if scale > 1:
        frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    images = [Image.fromarray(f) for f in to_uint8(frames)]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(1000 / fps), loop=0)
    return Path(path)


def save_webp(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """An animated WebP (what ComfyUI's frontend and browsers play inline)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in to_uint8(frames)]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                       loop=0, quality=90)
    return Path(path)


def save_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8, scale: int = 1) -> Path:
    """H.264 through PyAV; sizes are padded to even numbers as the codec needs."""
    import av

    if scale > 1:
        frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    data = to_uint8(frames)
    n, h, w, _ = data.shape
    data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
            stream.options = {"crf": "18"}
            for frame in data:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> torch.Tensor:
    """Decode a video file into `[N, H, W, 3]` floats in [0, 1]."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return torch.stack(frames).float() / 255.0


def loss_plot(history: list[dict], width: int = 512, height: int = 256) -> torch.Tensor:
    """A training run's loss per step (light) and its running mean (dark) as an IMAGE `[1, H, W, 3]`; the steps where a
    preview was taken (records with "preview") are marked by orange lines."""
    from PIL import Image, ImageDraw

    losses = [r["loss"] for r in history]
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if losses:
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        lo, hi = min(losses), max(losses)
        span = hi - lo or 1.0
        margin = 24

        def point(i, v):
            x = margin + (width - 2 * margin) * (i / max(1, len(losses) - 1))
            return x, height - margin - (height - 2 * margin) * (v - lo) / span

        for i, record in enumerate(history):
            if "preview" in record:
                x = round(point(i, lo)[0])
                draw.line([(x, margin), (x, height - margin)], fill=(255, 170, 60), width=1)
        for values, colour in ((losses, (170, 190, 230)), (smooth, (20, 60, 160))):
            draw.line([point(i, v) for i, v in enumerate(values)] if len(values) > 1 else [point(0, values[0])] * 2,
                      fill=colour, width=2)
        draw.text((margin, 4), f"loss {smooth[-1]:.4f} at step {len(losses)} (range {lo:.4f} to {hi:.4f})",
                  fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


GROUP_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def series_plot(values: torch.Tensor, labels: list[str], title: str, width: int = 512, height: int = 256
                ) -> torch.Tensor:
    """Curves `values[:, j]` over the steps (one colour per column, labelled) as an IMAGE `[1, H, W, 3]`; the
    vertical axis spans the values' range, written in the title."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    steps, series = values.shape
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0
    margin, legend = 24, 110

    def point(i, v):
        x = margin + (width - 2 * margin - legend) * (i / max(1, steps - 1))
        return x, height - margin - (height - 2 * margin) * (float(v) - lo) / span

    for j in range(series):
        colour = GROUP_COLOURS[j % len(GROUP_COLOURS)]
        line = [point(i, v) for i, v in enumerate(values[:, j])]
        draw.line(line if steps > 1 else line * 2, fill=colour, width=2)
        draw.text((width - legend, margin + 12 * j), labels[j], fill=colour)
    draw.text((margin, 4), f"{title} (from {lo:.4f} to {hi:.4f}; steps 1 to {steps})", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def draw_boxes(frames: torch.Tensor, boxes: torch.Tensor, colour=(1.0, 0.9, 0.1), width: int | None = None
               ) -> torch.Tensor:
    """Frames `[F, H, W, 3]` with each frame's box `[F, 4]` (normalised xyxy) outlined; a new tensor."""
    out = frames.clone()
    f, h, w, _ = out.shape
    width = width or max(1, min(h, w) // 64)
    paint = torch.tensor(colour, dtype=out.dtype)
    for i in range(f):
        x1, x2 = (int(round(float(v) * w)) for v in boxes[i, [0, 2]])
        y1, y2 = (int(round(float(v) * h)) for v in boxes[i, [1, 3]])
        x1, y1 = max(0, min(w - 1, x1)), max(0, min(h - 1, y1))
        x2, y2 = max(x1 + 1, min(w, x2)), max(y1 + 1, min(h, y2))
        out[i, y1:y1 + width, x1:x2] = paint
        out[i, max(y1, y2 - width):y2, x1:x2] = paint
        out[i, y1:y2, x1:x1 + width] = paint
        out[i, y1:y2, max(x1, x2 - width):x2] = paint
    return out


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Two clips `[F, H, W, 3]` as one, left and right with a white gap: the right one resized to the left's height
    (keeping its proportions), both cut to the shorter clip's frames."""
    import torch.nn.functional as F

    frames, height = min(len(left), len(right)), left.shape[1]
    left, right = left[:frames].float(), right[:frames].float()
    if right.shape[1] != height:
        width = max(1, round(right.shape[2] * height / right.shape[1]))
        right = F.interpolate(right.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False,
                              antialias=True).permute(0, 2, 3, 1).clamp(0, 1)
    white = torch.ones(frames, height, gap, left.shape[-1], device=left.device)
    return torch.cat([left, white, right.to(left.device)], 2)
