"""Every shipped workflow in the real ComfyUI frontend (headless Chromium): it loads without a missing-node dialog
or an error, keeps the widget values stored in its file, has no seed that the frontend would change on the next
run, has no node over another, and its stored view starts at its left edge. The shapes-world workflows are then
run from the Run button. Skipped with a message where Chromium or playwright is missing."""

from __future__ import annotations

import json
import math
import shutil
import time

import browser
import pytest
from comfy_host import MOTION_CLIP, REPO, SUBJECT_PHOTO
from workflow_api import ordered_inputs, shipped, shipped_before, stored_widget_values

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# The shapes-world workflows as shipped before the world's text encoder became a CLIP and the camera nodes lost
# latent_layout: saved workflows of users, which must still load and run.
OLD_COMMIT, OLD_WORLD_WORKFLOWS = "8dfa241", ["01", "02", "03", "04", "05"]
# Runnable as shipped on the test server (the shapes world ships in the pack; the encoders are the test's tiny ones).
# By their numbers: generate, camera, box steering, representations, customize, customize with DualReal, a motion
# with SynMotion.
WORLD_WORKFLOWS = ["02", "04", "05", "03", "01", "11", "13"]
RUN_TIMEOUT = 900  # a guard against hangs
# Set in the page before Run, as a user would: the customize workflows' training shortened (their full runs are
# benchmarks/world_workflow.py's), under a run name of their own so that no checkpoint of the shipped one is used.
WIDGET_CHANGES = {"01": {
    "CustVid_TrainSubjectLoRA": {"steps": 3, "run_name": "world_subject_browser_test"},
    "CustVid_TrainMotionLoRA": {"steps": 2, "run_name": "world_motion_browser_test"}},
    "11": {"CustVid_TrainDualReal": {"steps": 4, "run_name": "world_dualreal_browser_test"}},
    "13": {"CustVid_SubjectPriorClips": {"count": 4, "steps": 2},
           "CustVid_TrainSynMotion": {"steps": 4, "run_name": "world_synmotion_browser_test"}}}

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=f"browser test skipped: {browser.missing()}")


@pytest.fixture(scope="module")
def ui(comfy_server):
    provide_user_inputs(comfy_server)
    with browser.frontend(comfy_server) as ui:
        yield ui


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def loaded(ui):
    """Each workflow loaded once: its file, the graph as the frontend holds it, and the errors logged meanwhile."""
    cache = {}

    def load(path):
        if path not in cache:
            workflow = json.loads(path.read_text())
            ui.errors.clear()
            graph = ui.load(workflow)
            cache[path] = workflow, graph, list(ui.errors)
        return cache[path]

    return load


def provide_user_inputs(server) -> None:
    """The photos and clips the Wan workflows ask the user for, as the user would put them in input/."""
    examples = {"LoadImage": SUBJECT_PHOTO, "LoadVideo": MOTION_CLIP}
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            target = server.base / "input" / str((node.get("widgets_values") or [""])[0])
            if node["type"] in examples and not target.exists():
                shutil.copyfile(server.base / "input" / examples[node["type"]], target)


def widget_problems(workflow: dict, graph: dict, object_info: dict) -> list[str]:
    """Widget values the frontend holds that differ from the file's `widgets_values`: in place (as the frontend
    would save them: changed or undefined values) and by name (each value on the widget of the input the
    server's schema gives it: a widget the frontend adds, such as a seed's control, moves the values after it)."""
    problems = []
    held = {n["id"]: n for n in graph["nodes"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        stored, saved = node.get("widgets_values") or [], held[node["id"]]["saved"]
        if len(saved) < len(stored):
            problems.append(f"{where}: the file stores {len(stored)} widget values, the frontend has {len(saved)}")
        problems += [f"{where} widget {i}: file {want!r}, frontend {got!r}"
                     for i, (want, got) in enumerate(zip(stored, saved)) if not same_value(want, got)]
        problems += [f"{where} widget {name} is undefined" for name, _, undefined in held[node["id"]]["widgets"] if undefined]
        if node["type"] not in object_info:
            continue  # drawn by the frontend only (notes)
        by_name = held_by_name(held[node["id"]]["widgets"])
        for name, want in stored_widget_values(node, object_info[node["type"]]).items():
            if name not in by_name:
                problems.append(f"{where}: the frontend has no widget {name}")
            elif not same_value(want, by_name[name]):
                problems.append(f"{where} {name}: file {want!r}, frontend {by_name[name]!r}")
        declared = {name for name, spec in ordered_inputs(object_info[node["type"]])
                    if len(spec) > 1 and spec[1].get("control_after_generate")}
        problems += [f"{where}: the frontend adds {name}, which the server's schema does not declare"
                     for name in by_name if name.endswith(".control_after_generate")
                     and name.split(".")[0] not in declared]
    return problems


def held_by_name(widgets: list) -> dict:
    """The frontend's widget values by input name; a control widget under `<input>.control_after_generate`."""
    named, previous = {}, None
    for name, value, _ in widgets:
        named[f"{previous}.{name}" if name == "control_after_generate" and previous else name] = value
        previous = name
    return named


def same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def seed_control_problems(graph: dict) -> list[str]:
    """Widgets that change a value after (or before) each run and are not set to 'fixed'."""
    return [f"node {n['id']} ({n['type']}): {name} is {value!r}" for n in graph["nodes"]
            for name, value, _ in n["widgets"] if name.startswith("control_") and value != "fixed"]


def overlap_problems(graph: dict) -> list[str]:
    nodes = graph["nodes"]
    return [f"node {a['id']} ({a['type']}) {a['bounding']} overlaps node {b['id']} ({b['type']}) {b['bounding']}"
            for i, a in enumerate(nodes) for b in nodes[i + 1:] if browser.overlaps(a["bounding"], b["bounding"])]


def view_problems(graph: dict) -> list[str]:
    """The stored view must show the graph's left edge (and its top) in the canvas left free by the sidebar and
    menus, close to them rather than somewhere in the middle."""
    (dx, dy), scale = graph["view"]["offset"], graph["view"]["scale"]
    left = (min(n["bounding"][0] for n in graph["nodes"]) + dx) * scale
    top = (min(n["bounding"][1] for n in graph["nodes"]) + dy) * scale
    problems = []
    if not graph["free_left"] <= left <= graph["free_left"] + 100:
        problems.append(f"the graph's left edge is at {left:.0f}px, the canvas is free from {graph['free_left']:.0f}px")
    if not graph["free_top"] <= top <= graph["free_top"] + 100:
        problems.append(f"the graph's top is at {top:.0f}px, the canvas is free from {graph['free_top']:.0f}px")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_loads_without_missing_nodes_or_errors(loaded, path):
    workflow, graph, errors = loaded(path)
    assert [d for d in graph["dialogs"] if "missing nodes" in d.lower()] == []
    assert without_offline_download_probes(errors, workflow) == []


def without_offline_download_probes(errors: list[str], workflow: dict) -> list[str]:
    """`errors` less those of the missing-models dialog asking each offered download (the loaders'
    `properties.models`) for its size, which a machine without internet cannot reach: a failed load of that URL
    and the frontend's "Error fetching file size" after it. Those are the network's failures, not the workflow's."""
    urls = {m["url"] for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])}
    probes = [e for e in errors if e.startswith("Failed to load resource") and any(e.endswith(f"({u})") for u in urls)]
    left, unanswered = [], len(probes)
    for e in errors:
        if e in probes:
            continue
        if unanswered and e.startswith("Error fetching file size"):
            unanswered -= 1
            continue
        left.append(e)
    return left


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_as_stored(loaded, object_info, path):
    workflow, graph, _ = loaded(path)
    assert widget_problems(workflow, graph, object_info) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_seeds_stay_fixed(loaded, path):
    _, graph, _ = loaded(path)
    assert seed_control_problems(graph) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_overlaps_another(loaded, path):
    _, graph, _ = loaded(path)
    assert overlap_problems(graph) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_view_starts_at_the_left_edge(loaded, path):
    _, graph, _ = loaded(path)
    assert view_problems(graph) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_run_twice_queues_the_same_prompt(ui, path):
    """Pressing Run twice sends the same prompt (no widget changed in between). The server's answer is stood in
    for, so that nothing runs here: the frontend updates its widgets once the prompt is accepted."""
    sent = []

    def accept(route):
        sent.append(route.request.post_data_json["prompt"])
        route.fulfill(json={"prompt_id": f"custvid-test-{len(sent)}", "number": len(sent), "node_errors": {}})

    ui.load(json.loads(path.read_text()))
    ui.close_dialogs()  # as a user closes the missing-models dialog of a Wan workflow (its files are not here)
    ui.page.route("**/api/prompt", accept)
    try:
        for count in (1, 2):
            ui.run_button().click()
            deadline = time.time() + 30
            while len(sent) < count and time.time() < deadline:
                ui.page.wait_for_timeout(100)
            ui.page.wait_for_timeout(300)  # the after-queue widget updates
    finally:
        ui.page.unroute("**/api/prompt")
    assert len(sent) == 2
    assert sent[0] == sent[1]


def test_checks_catch_a_broken_workflow(ui, object_info):
    """The checks above fail on what they guard against: an unknown node type, a seed left to randomize, a
    value on another widget than the server's, a node put over another, a view far from the graph."""
    workflow = shipped("04")
    nodes = {n["type"]: n for n in workflow["nodes"]}
    nodes["KSamplerSelect"]["type"] = "CustVid_NoSuchNode"
    nodes["RandomNoise"]["widgets_values"] = [0, "randomize"]
    nodes["CFGGuider"]["pos"] = list(nodes["CustVid_CameraShiftSamplerV2"]["pos"])
    workflow["extra"]["ds"] = {"scale": 0.8, "offset": [-3000, 0]}
    graph = ui.load(workflow)
    ui.close_dialogs()
    assert any("missing nodes" in d.lower() for d in graph["dialogs"])
    assert any("RandomNoise" in p for p in seed_control_problems(graph))
    assert any("CFGGuider" in p for p in overlap_problems(graph))
    assert view_problems(graph)
    # A server whose schema orders BasicScheduler's widgets otherwise than the frontend does.
    info = json.loads(json.dumps(object_info))
    required = info["BasicScheduler"]["input"]["required"]
    info["BasicScheduler"]["input"]["required"] = {k: required[k] for k in ("model", "steps", "scheduler", "denoise")}
    assert widget_problems(workflow, graph, object_info) == []
    assert any("BasicScheduler" in p for p in widget_problems(workflow, graph, info))


@pytest.mark.parametrize("name", WORLD_WORKFLOWS)
def test_world_workflow_runs_from_the_run_button(ui, comfy_server, name):
    run_from_the_run_button(ui, comfy_server, shipped(name), WIDGET_CHANGES.get(name, {}))


@pytest.mark.parametrize("number", OLD_WORLD_WORKFLOWS)
def test_a_workflow_saved_before_loads_with_its_widget_values(ui, object_info, number):
    """Saved with the deprecated world nodes, Box Steering's world_text link and the camera's latent_layout."""
    workflow = shipped_before(number, OLD_COMMIT)
    ui.errors.clear()
    graph = ui.load(workflow)
    assert [d for d in graph["dialogs"] if "missing nodes" in d.lower()] == []
    assert without_offline_download_probes(list(ui.errors), workflow) == []
    assert widget_problems(workflow, graph, object_info) == []


@pytest.mark.parametrize("number", ["04", "05"])
def test_a_camera_or_box_steering_workflow_saved_before_runs_from_the_run_button(ui, comfy_server, number):
    run_from_the_run_button(ui, comfy_server, shipped_before(number, OLD_COMMIT), {})


def run_from_the_run_button(ui, comfy_server, workflow: dict, changes: dict) -> None:
    """Load, set `changes` ({node type: {widget: value}}) in the page as a user would, press Run, and check that the
    run succeeds and every output node wrote its files."""
    ui.load(workflow)
    ui.errors.clear()
    for node_type, values in changes.items():
        ui.page.evaluate("""([type, values]) => window.app.graph.nodes.filter(n => n.type === type).forEach(n =>
            n.widgets.forEach(w => { if (w.name in values) w.value = values[w.name]; }))""", [node_type, values])
    with ui.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as queued:
        ui.run_button().click()
    assert queued.value.ok, queued.value.text()
    prompt_id = queued.value.json()["prompt_id"]
    entry = wait_for_history(comfy_server, prompt_id, RUN_TIMEOUT)
    errors = [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors
    output_nodes = [n for n in workflow["nodes"] if n["type"] in ("SaveVideo", "PreviewImage") and n.get("mode", 0) == 0]
    assert output_nodes
    for node in output_nodes:
        files = entry["outputs"].get(str(node["id"]), {}).get("images", [])
        assert files, f"{node['type']} {node['id']} gave no output"
        for f in files:
            path = comfy_server.base / f["type"] / f["subfolder"] / f["filename"]
            assert path.stat().st_size > 0, path



def wait_for_history(server, prompt_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log: {server.log}")
