"""The template browser's thumbnails: `<workflow>.jpg` beside each workflow in `workflows/`.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/workflow_thumbnails.py [--out out/thumbnails] [--only 02,04]

The workflows that need no download (the shapes world's) are queued as shipped in a real ComfyUI (`--cpu`, a
fresh base folder inside --out; the customization trains for a few minutes) and their thumbnail shows what
they produce: four frames of the video they save, or the flow previews of the representations workflow. The
Wan workflows need the Wan files and are not run: their thumbnail draws the graph (each node a box where it
sits; boxes with a download offer in amber, CustVid's nodes in blue) under the workflow's title.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))
sys.path.insert(0, str(REPO))

SIDE = 256  # pixels; the browser shows thumbnails as squares
QUALITY = 85


def needs_download(workflow: dict) -> bool:
    """A loader offers a download (ComfyUI's `properties.models`) for a file that does not ship with CustVid."""
    return any(n.get("properties", {}).get("models") for n in workflow["nodes"])


def four_frames(frames: torch.Tensor) -> torch.Tensor:
    """Four evenly spaced frames `[N, H, W, 3]` tiled two by two, as a square `[SIDE, SIDE, 3]` image."""
    from custvid_core.media import contact_sheet

    picks = torch.linspace(0, len(frames) - 1, 4).round().long()
    sheet = contact_sheet(frames[picks], columns=2, gap=0)
    scaled = torch.nn.functional.interpolate(sheet.permute(2, 0, 1)[None], size=(SIDE, SIDE), mode="nearest")
    return scaled[0].permute(1, 2, 0)


def produced_frames(server, prompt: dict, result: dict) -> torch.Tensor:
    """The frames a run produced: its saved video, else the images it previewed."""
    from PIL import Image

    from custvid_core.media import read_video

    for node in prompt.values():
        if node["class_type"] == "SaveVideo":
            (video,) = server.saved(node["inputs"]["filename_prefix"])
            return read_video(video)
    shown = [image for output in result["outputs"].values() for image in output.get("images", [])]
    return torch.stack([torch.from_numpy(__import__("numpy").array(
        Image.open(server.base / image["type"] / image["subfolder"] / image["filename"]).convert("RGB"))) / 255.0
                        for image in shown])


def graph_card(workflow: dict, title: str):
    """The workflow's nodes as boxes at their places and its links as lines, over its title."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (SIDE, SIDE), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    band = 84
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] - 30 for n in nodes.values())  # the title bar sits above pos
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    scale = min((SIDE - 16) / (right - left), (SIDE - band - 16) / (bottom - top))
    margin_x = (SIDE - (right - left) * scale) / 2
    margin_y = (SIDE - band - (bottom - top) * scale) / 2

    def box(n):
        x, y = (n["pos"][0] - left) * scale + margin_x, (n["pos"][1] - 30 - top) * scale + margin_y
        return x, y, x + n["size"][0] * scale, y + (n["size"][1] + 30) * scale

    for _, src, _, dst, _, _ in workflow["links"]:
        a, b = box(nodes[src]), box(nodes[dst])
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(110, 110, 120), width=1)
    for n in nodes.values():
        if n.get("properties", {}).get("models"):
            fill = (196, 140, 40)
        elif n["type"].startswith("CustVid_"):
            fill = (63, 120, 158)
        elif n["type"] in ("Note", "MarkdownNote"):
            fill = (70, 70, 60)
        else:
            fill = (85, 85, 95)
        draw.rectangle(box(n), fill=fill, outline=(20, 20, 24))
    font = ImageFont.load_default(size=15)
    lines, line = [], ""
    for word in title.split():
        if line and draw.textlength(f"{line} {word}", font=font) > SIDE - 16:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for i, text in enumerate(lines[:2]):
        draw.text((8, SIDE - band + 6 + 19 * i), text, fill=(235, 235, 235), font=font)
    legend = ("amber: model files ComfyUI offers to download", (196, 140, 40)) if needs_download(workflow) else \
        ("runs as it opens: no download", (150, 150, 160))
    draw.text((8, SIDE - 24), legend[0], fill=legend[1], font=ImageFont.load_default(size=11))
    return image


def save_jpeg(image, path: Path) -> None:
    from custvid_core.files import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=QUALITY, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/thumbnails", help="where ComfyUI's base folder is made")
    parser.add_argument("--only", default="", help="the workflows' numbers, comma-separated (default: all)")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")

    from comfy_host import running_server
    from PIL import Image
    from workflow_api import to_api

    from custvid_core.media import to_uint8

    paths = sorted((REPO / "workflows").glob("*.json"))
    if args.only:
        paths = [p for p in paths if p.name.split(" ", 1)[0] in args.only.split(",")]
    for path in paths:
        workflow = json.loads(path.read_text())
        if needs_download(workflow):
            save_jpeg(graph_card(workflow, path.stem.split(" ", 1)[-1]), path.with_suffix(".jpg"))
            print(f"{path.with_suffix('.jpg').name}: the graph")
    base = Path(args.out).resolve() / "comfy_base"  # ComfyUI runs in its own folder
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    with running_server(base) as server:
        for path in paths:
            workflow = json.loads(path.read_text())
            if needs_download(workflow):
                continue
            prompt = to_api(workflow, server.object_info())
            result = server.run(prompt, timeout=3600)
            if not result["ok"]:
                sys.exit(f"{path.name}: {result['error']}")
            sheet = four_frames(produced_frames(server, prompt, result))
            save_jpeg(Image.fromarray(to_uint8(sheet[None])[0]), path.with_suffix(".jpg"))
            print(f"{path.with_suffix('.jpg').name}: what it produced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
