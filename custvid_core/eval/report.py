"""Scores as text, tables (JSON, CSV, markdown in the benchmark's format) and a small bar chart."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..media import GROUP_COLOURS
from .measure import METRICS

# Scores on a 0-1 scale (cosines, 1 - errors): their bars are drawn on that scale; the others (pixels) are
# drawn against the largest value of the runs shown.
UNIT_SCALE = {"clip_t", "clip_i", "dino_i", "r_clip", "r_dino", "t_cons", "flicker", "motion_smoothness",
              "motion_fidelity"}


def measured(rows: list[dict[str, float]]) -> list[str]:
    """The metrics (in METRICS' order) that at least one row measured."""
    return [k for k in METRICS if any(not math.isnan(r.get(k, math.nan)) for r in rows)]


def scores_text(scores: dict[str, float]) -> str:
    """One line per measured metric: its value, what it is and which way is better."""
    lines = [f"{k}: {scores[k]:.4f}  ({METRICS[k][0]}; {METRICS[k][1]} is better)" for k in measured([scores])]
    return "\n".join(lines) or "nothing measured: connect the encoders and the references the metrics need"


def comparison_text(a: dict[str, float], b: dict[str, float], labels: tuple[str, str]) -> str:
    """The two runs' scores side by side, with b - a and which way is better."""
    lines = [f"| metric | {labels[0]} | {labels[1]} | {labels[1]} - {labels[0]} | better |",
             "| --- | --- | --- | --- | --- |"]
    for k in measured([a, b]):
        lines.append(f"| {k} | {a[k]:.4f} | {b[k]:.4f} | {b[k] - a[k]:+.4f} | {METRICS[k][1]} |")
    return "\n".join(lines)


def mean_over(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else math.nan


def markdown_table(rows: list[dict], note: str) -> str:
    """Per video and averaged, in the format of the benchmark's results.md."""
    columns = measured(rows)
    lines = [note, "", "| video | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for row in rows:
        lines.append(f"| {row['video']} | " + " | ".join(f"{row[k]:.3f}" for k in columns) + " |")
    lines.append("| **average** | " + " | ".join(f"{mean_over(rows, k):.3f}" for k in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: str | Path, rows: list[dict], note: str, settings: dict) -> None:
    """results.json (every video and the settings), results.csv and results.md in `out`, each written whole."""
    out = Path(out)
    columns = ["video", *measured(rows)]
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"rows": rows, "average": {k: mean_over(rows, k) for k in columns[1:]},
                                   "settings": settings}, indent=1))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_table(rows, note))


def score_chart(runs: list[dict[str, float]], labels: list[str], width: int = 512) -> torch.Tensor:
    """Bars of the measured metrics, one colour per run, as an IMAGE `[1, H, W, 3]`."""
    from PIL import Image, ImageDraw

    names = measured(runs)
    row, name_width, margin = 14 * len(runs) + 8, 170, 8
    height = max(row, row * len(names)) + 2 * margin + 14
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(labels):
        draw.text((name_width + 110 * j, margin - 4), label, fill=GROUP_COLOURS[j % len(GROUP_COLOURS)])
    bar_width = width - name_width - 2 * margin - 60
    for i, name in enumerate(names):
        top = margin + 14 + i * row
        draw.text((margin, top + 2), name, fill=(0, 0, 0))
        values = [r.get(name, math.nan) for r in runs]
        scale = 1.0 if name in UNIT_SCALE else max((abs(v) for v in values if not math.isnan(v)), default=1.0) or 1.0
        for j, value in enumerate(values):
            y = top + 14 * j
            if math.isnan(value):
                draw.text((name_width, y), "-", fill=(120, 120, 120))
                continue
            length = int(bar_width * min(1.0, abs(value) / scale))
            draw.rectangle([name_width, y + 2, name_width + max(1, length), y + 11],
                           fill=GROUP_COLOURS[j % len(GROUP_COLOURS)])
            draw.text((name_width + length + 4, y), f"{value:.3f}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
