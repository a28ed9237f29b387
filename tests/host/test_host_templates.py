"""The workflows as ComfyUI's template browser and missing-models dialog read them (frontend 1.35.9 on
ComfyUI v0.8.0).

The browser lists a pack's templates from /api/workflow_templates; a custom-node template's card shows its
file name as the title and, with '-' and '_' made spaces, as the description, and the thumbnail
`<name>.jpg` beside it; "A-Z" orders by that title. A loader's `properties.models` entries whose name is the
loader's file make the frontend check that folder (/experiment/models/<directory>) and offer the
download when the file is missing, from huggingface.co or civitai.com only, for .safetensors/.sft files."""

import io
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from comfy_host import REPO

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SHIPPED_WEIGHTS = REPO / "custvid_core" / "world" / "weights"
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae",
                  "CLIPVisionLoader": "clip_vision",
                  "CustVid_LoadDINOv2": "custvid_dino", "CustVid_LoadRAFT": "custvid_raft",
                  "CustVid_LoadShapesWorld": "custvid_world_text", "CustVid_LoadShapesWorldClip": "custvid_world_text"}
# What the frontend's missing-models dialog accepts (MissingModelsWarning).
DOWNLOAD_SOURCES = ("https://civitai.com/", "https://huggingface.co/")
DOWNLOAD_SUFFIXES = (".safetensors", ".sft")


def _loaders(workflow: dict):
    for node in workflow["nodes"]:
        if node["type"] in LOADER_FOLDERS and node.get("mode", 0) == 0:
            yield node, node["widgets_values"][0]


def _ships_with_the_pack(name: str) -> bool:
    return any(p.name == name for p in SHIPPED_WEIGHTS.glob("*/*"))


def _needs_download(workflow: dict) -> bool:
    return any(not _ships_with_the_pack(name) for _, name in _loaders(workflow))


def test_the_browser_lists_every_workflow_with_its_thumbnail(comfy_server):
    import requests
    from PIL import Image

    listed = comfy_server.get("/api/workflow_templates")["CustVid"]
    assert sorted(listed) == [p.stem for p in WORKFLOWS]
    for name in listed:
        url = f"{comfy_server.url}/api/workflow_templates/CustVid/{quote(name)}"
        served = requests.get(url + ".json", timeout=30)
        assert served.status_code == 200 and served.json() == json.loads((REPO / "workflows" / f"{name}.json").read_text())
        thumbnail = requests.get(url + ".jpg", timeout=30)
        assert thumbnail.status_code == 200, name
        image = Image.open(io.BytesIO(thumbnail.content))
        assert image.format == "JPEG" and image.size[0] == image.size[1] >= 128, name  # cards are square
        assert len(thumbnail.content) < 64_000, name


def test_titles_read_as_titles_and_say_which_need_no_download():
    names = [p.stem for p in WORKFLOWS]  # "A-Z" in the browser; the numbers keep the order
    for name in names:
        number, title = name.split(" ", 1)
        assert number.isdigit() and len(number) == 2 and title[0].isupper(), name
        assert not set("-_") & set(title), name  # the card's description is the title, not a mangled copy
    # A workflow keeps its number (users find it by it), so a new one takes the next number whatever it needs.
    assert [int(name[:2]) for name in names] == list(range(1, len(names) + 1)), names
    downloads = [_needs_download(json.loads(p.read_text())) for p in WORKFLOWS]
    assert any(downloads) and not all(downloads)
    for name, download in zip(names, downloads):
        assert ("(no download)" in name) != download, name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem[:2])
def test_loaders_of_files_to_download_offer_the_download(comfy_server, path):
    """Each loader of a file that does not ship with CustVid names it in its `models`, with its folder and a
    URL the frontend accepts; a file of that name put in that folder is what the loader lists and what the
    frontend finds there (so the dialog stops offering it)."""
    folders = comfy_server.get("/internal/folder_paths")
    for node, name in _loaders(json.loads(path.read_text())):
        offers = node.get("properties", {}).get("models", [])
        if _ships_with_the_pack(name):
            assert not offers, (node["type"], name)
            continue
        assert [o["name"] for o in offers] == [name], (node["type"], offers)
        offer = offers[0]
        assert offer["directory"] == LOADER_FOLDERS[node["type"]] and offer["directory"] in folders
        assert offer["url"].startswith(DOWNLOAD_SOURCES) and name.endswith(DOWNLOAD_SUFFIXES), offer
        assert offer["url"].rsplit("/", 1)[-1] == Path(name).name, offer  # the file the browser downloads

        placed = Path(folders[offer["directory"]][0]) / name
        created = not placed.exists()
        if created:
            placed.parent.mkdir(parents=True, exist_ok=True)
            placed.write_bytes(b"")
        try:
            listing = comfy_server.get(f"/experiment/models/{offer['directory']}")
            assert name in [entry["name"] for entry in listing], offer
            spec = comfy_server.object_info()[node["type"]]["input"]["required"]
            options = next(s[0] if isinstance(s[0], list) else s[1].get("options", []) for s in spec.values())
            assert name in options, (node["type"], name)
        finally:
            if created:
                placed.unlink()
