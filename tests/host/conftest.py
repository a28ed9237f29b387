"""Host tests: the pack inside a real ComfyUI (v0.8.0 or later) pointed to by COMFYUI_PATH.

A ComfyUI server is started once per session with `--cpu` on a temporary base directory whose
custom_nodes/ links to this repository and whose models/ holds tiny random DINOv2 and RAFT
weights written here. Tests talk to it over its HTTP API, as the browser does. Without
COMFYUI_PATH every host test is skipped.
"""

import os

import pytest
from comfy_host import COMFYUI_PATH, running_server


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: host tests need a ComfyUI checkout")
    for item in items:
        if "tests/host/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("comfy_base")) as server:
        yield server
