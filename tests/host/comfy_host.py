"""Helpers for the host tests: a ComfyUI server driven over its HTTP API, and the files it is given."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
sys.path.insert(0, str(REPO / "tests"))
from builders import TINY_DINO, moving_square_clip  # noqa: E402

RAFT_FILE = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
SUBJECT_PHOTO = "custvid_example_subject.png"
MOTION_CLIP = "custvid_example_motion.mp4"


def import_comfy():
    """Import ComfyUI's modules into this process (CPU mode) for in-process checks."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)


def import_pack():
    """Import this repository as ComfyUI imports a custom node package (in this process)."""
    import importlib.util

    import_comfy()
    if "custvid_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("custvid_pack", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["custvid_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["custvid_pack"]


class Server:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        import requests

        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def object_info(self) -> dict:
        return self.get("/object_info")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for it. Returns {'ok', 'error', 'outputs', 'node_errors'}."""
        import requests

        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=30)
        if r.status_code != 200:  # refused at validation, before anything ran
            body = r.json()
            return {"ok": False, "error": json.dumps(body), "outputs": {}, "node_errors": body.get("node_errors", {})}
        prompt_id = r.json()["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                error, cached = None, []
                for kind, data in status.get("messages", []):
                    if kind == "execution_error":
                        error = f"{data.get('node_type')}: {data.get('exception_message')}"
                    if kind == "execution_cached":
                        cached += data.get("nodes", [])
                return {"ok": status.get("status_str") == "success", "error": error,
                        "outputs": entry.get("outputs", {}), "node_errors": {}, "cached": cached}
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log: {self.log}")

    def clear_cache(self) -> None:
        """Make the next prompt run every node again rather than reuse the cached results of the last ones."""
        import requests

        requests.post(self.url + "/free", json={"free_memory": True}, timeout=30).raise_for_status()
        time.sleep(1)  # the server drops its caches between prompts, once its queue worker wakes

    def saved(self, prefix: str) -> list[Path]:
        """Files under the output folder whose path starts with `prefix` and that hold more than a header."""
        return sorted(p for p in (self.base / "output").glob(prefix + "*") if p.stat().st_size > 1000)

    def alive(self) -> bool:
        try:
            self.get("/system_stats")
            return True
        except Exception:
            return False


@contextmanager
def running_server(base: Path) -> Iterator[Server]:
    """ComfyUI (COMFYUI_PATH) started with `--cpu` on the base directory `base`, whose custom_nodes/ links to
    this repository and whose models/ and input/ get the tiny weights and example inputs; stopped on exit."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "CustVid"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    (base / "user").mkdir(exist_ok=True)
    write_tiny_weights(base / "models")
    write_inputs(base / "input")
    port = free_port()
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--base-directory", str(base),
                                 "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                                 "--database-url", "sqlite:///:memory:"],
                                cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", base, log)
    deadline = time.time() + 300
    try:
        while not server.alive():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_weights(models: Path) -> None:
    """Random weights of the real architectures, under the names the shipped workflows use."""
    from safetensors.torch import save_file

    from custvid_core.representations.motion import build_raft
    from custvid_core.representations.subject import build_dinov2

    torch.manual_seed(0)
    build_dinov2(TINY_DINO).model.save_pretrained(models / "custvid" / "dino" / "dinov2-base")
    (models / "custvid" / "raft").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_raft("raft_large").model.state_dict(), models / "custvid" / "raft" / RAFT_FILE)
    torch.manual_seed(0)
    small = build_raft("raft_small").model.state_dict()
    torch.save(small, models / "custvid" / "raft" / "tiny_raft_small.pth")
    # Files a user could put in the wrong place, or that arrived damaged.
    save_file({k: v.contiguous() for k, v in small.items()},
              str(models / "custvid" / "dino" / "raft_in_dino_folder.safetensors"))
    (models / "custvid" / "raft" / "corrupt.pth").write_bytes(b"not a checkpoint")


def write_inputs(inputs: Path) -> None:
    """The clip and subject photo the shipped workflows name, as a user would provide them."""
    from PIL import Image

    from custvid_core.media import save_mp4

    inputs.mkdir(parents=True, exist_ok=True)
    clip, masks = example_clip()
    save_mp4(clip, inputs / MOTION_CLIP)
    # A cut-out photo: the subject opaque, the background transparent.
    rgba = torch.cat([clip[0], masks[0, ..., None]], -1)
    Image.fromarray((rgba * 255).round().byte().numpy(), "RGBA").save(inputs / SUBJECT_PHOTO)


def example_clip():
    return moving_square_clip(frames=6, size=(64, 96), step=(4, 1), side=16)


def custvid_import_seconds(log_text: str) -> float | None:
    m = re.search(r"^\s*([\d.]+) seconds(?: \(IMPORT FAILED\))?: .*custom_nodes[/\\]CustVid\s*$", log_text, re.M)
    return float(m.group(1)) if m else None


def tiny_world(layers: int = 2, **config):
    """A tiny shapes-world-layout Wan 2.1 (`config` overrides the world's, e.g. 48 channels for Wan 2.2's
    layout) with every block given an effect (diffusers starts the adaLN tables at zero)."""
    from custvid_core.world.model import DEFAULT_CONFIG, build_world

    world = build_world({**DEFAULT_CONFIG, "num_layers": layers, "ffn_dim": 64, **config})
    with torch.no_grad():
        for p in world.backbone.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return world


def tiny_world_wan(folder: Path):
    """`tiny_world()` written in ComfyUI's native keys and loaded by ComfyUI's own loader.
    Returns (ModelPatcher, World, path of the file)."""
    import_comfy()
    import comfy.sd

    from custvid_core.world.model import save_world

    world = tiny_world()
    path = folder / "tiny_wan.safetensors"
    save_world(world, path, folder / "tiny_text.safetensors")
    return comfy.sd.load_diffusion_model(str(path)), world, path


def tiny_wan_vae_weights() -> dict:
    """A Wan 2.1 VAE state dict (ComfyUI's architecture, 8 base channels) with small random weights:
    ComfyUI's layers skip weight initialisation."""
    import_comfy()
    from comfy.ldm.wan.vae import WanVAE

    return {k: torch.ones_like(v) if "gamma" in k else torch.randn_like(v) * (0.1 if v.ndim > 1 else 0.01)
            for k, v in WanVAE(dim=8, z_dim=16, temperal_downsample=[False, True, True]).state_dict().items()}


@contextmanager
def partially_loaded(patcher):
    """While inside, ComfyUI loads models as a small GPU does: only part of the weights resident, the rest cast on
    the fly (low-VRAM partial loading). Yields a list that receives, on leaving, `patcher`'s layers so cast."""
    import comfy.model_management as mm

    mm.unload_all_models()
    original = mm.load_models_gpu

    def partial(models, *args, **kwargs):
        for m in models:
            m.model_patches_to(m.load_device)
            m.load(m.load_device, lowvram_model_memory=1024, force_patch_weights=False, full_load=False)

    mm.load_models_gpu = partial
    cast_layers = []
    try:
        yield cast_layers
        cast_layers.extend(m for m in patcher.model.diffusion_model.modules() if getattr(m, "comfy_cast_weights", False))
    finally:
        mm.load_models_gpu = original
        mm.unload_all_models()
