"""DualReal's diagnostics from finished bench runs: each training run's loss per term (mean over the first and the
last tenth of the steps that had it), and the StageBlender controller's identity weight per group of blocks over the
training steps and over the sampling steps (the weights its plot draws).

    .venv/bin/python benchmarks/dualreal_diagnostics.py out/dualreal_a out/dualreal_b > diagnostics.md
    .venv/bin/python benchmarks/dualreal_diagnostics.py --plots docs/results out/dualreal_a > diagnostics.md

`--plots DIR` also draws each DualReal run's controller weights over the sampling steps of seed 0 (DualReal's
Figure 7) as `DIR/dualreal_controller_<case>_<method>.png`. Reads `<out>/work/<case>/<method>/`: a DualReal
method's `diagnostics.json`, a LoRA method's `checkpoint.pt` files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from custvid_core.media import series_plot

META = {"step", "loss", "lr", "grad_norm", "seconds"}
WEIGHT_KEYS = [f"identity_weight_{g}" for g in range(64)]  # a DualReal run's controller weights, per group


def training_weights(history: list[dict]) -> list[tuple[int, list[float]]]:
    """The controller's identity weight per group at a few steps of the run (mean over the 10 steps up to each)."""
    if not history or WEIGHT_KEYS[0] not in history[0]:
        return []
    keys = [k for k in WEIGHT_KEYS if k in history[0]]
    out = []
    for end in sorted({1, 10, len(history) // 10, len(history) // 4, len(history) // 2, len(history)}):
        window = history[max(0, end - 10):end]
        out.append((end, [sum(r[k] for r in window) / len(window) for k in keys]))
    return out


def term_means(history: list[dict]) -> dict[str, tuple[int, float, float]]:
    """Per loss term: (steps that had it, mean over the first tenth, mean over the last tenth)."""
    out = {}
    for term in sorted({k for r in history for k in r} - META - set(WEIGHT_KEYS)):
        values = [r[term] for r in history if term in r]
        tenth = max(1, len(values) // 10)
        out[term] = (len(values), sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth)
    return out


def histories(method_dir: Path) -> dict[str, list[dict]]:
    diagnostics = method_dir / "diagnostics.json"
    if diagnostics.exists():
        return {"dualreal": json.loads(diagnostics.read_text())["history"]}
    return {str(p.parent.relative_to(method_dir)): torch.load(p, weights_only=True)["history"]
            for p in sorted(method_dir.rglob("checkpoint.pt"))}


def plot(per_step: list[list[float]], path: Path) -> None:
    """The identity weight of each group over the sampling steps, as a PNG."""
    from PIL import Image

    values = torch.tensor(per_step)
    labels = [f"group {g}" for g in range(values.shape[1])]
    image = series_plot(values, labels, "identity weight per group of blocks")
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(path)


def main(outs: list[str], plots: Path | None = None) -> str:
    lines = ["### Training losses (mean over the first / last tenth of each term's steps)", "",
             "| case | method | run | term | steps | first | last |", "| --- | --- | --- | --- | --- | --- | --- |"]
    during = ["", "### The controller's identity weight per group of blocks while training (mean of the 10 steps up to each)",
              "", "| case | method | step | identity weight per group (motion: 0.2 minus it) |", "| --- | --- | --- | --- |"]
    weights = ["", "### The controller's identity weight per group of blocks over the sampling steps (seed 0)", "",
               "| case | method | step | identity weight per group (motion: 0.2 minus it) |", "| --- | --- | --- | --- |"]
    for out in outs:
        for method_dir in sorted(Path(out).glob("work/*/*")):
            case, method = method_dir.parent.name, method_dir.name
            for run, history in histories(method_dir).items():
                for term, (n, first, last) in term_means(history).items():
                    lines.append(f"| {case} | {method} | {run} | {term} | {n} | {first:.4f} | {last:.4f} |")
                for step, values in training_weights(history):
                    during.append(f"| {case} | {method} | {step}/{len(history)} | {', '.join(f'{w:.3g}' for w in values)} |")
            diagnostics = method_dir / "diagnostics.json"
            per_step = json.loads(diagnostics.read_text())["controller_identity_weights"].get("0", []) \
                if diagnostics.exists() else []
            if plots is not None and per_step:
                plot(per_step, plots / f"dualreal_controller_{case}_{method}.png")
            for i in sorted({0, len(per_step) // 4, len(per_step) // 2, 3 * len(per_step) // 4, len(per_step) - 1}):
                if 0 <= i < len(per_step):
                    cells = ", ".join(f"{w:.3g}" for w in per_step[i])
                    weights.append(f"| {case} | {method} | {i + 1}/{len(per_step)} | {cells} |")
    return "\n".join(lines + during + weights) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    plots = None
    if args[:1] == ["--plots"]:
        plots, args = Path(args[1]), args[2:]
    sys.stdout.write(main(args, plots))
