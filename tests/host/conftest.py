"""Host tests: the pack inside a real ComfyUI (v0.8.0 or later) pointed to by COMFYUI_PATH.

A ComfyUI server is started once per session with `--cpu` on a temporary base directory whose
custom_nodes/ links to this repository and whose models/ holds tiny random DINOv2 and RAFT
weights written here. Tests talk to it over its HTTP API, as the browser does. Without
COMFYUI_PATH every host test is skipped.
"""

import os
import subprocess
import sys
import time

import pytest
from comfy_host import COMFYUI_PATH, REPO, Server, free_port, write_inputs, write_tiny_weights


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: host tests need a ComfyUI checkout")
    for item in items:
        if "tests/host/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "CustVid").symlink_to(REPO, target_is_directory=True)
    (base / "user").mkdir()
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
    while not server.alive():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"ComfyUI did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
