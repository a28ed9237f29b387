"""Reading UI-format workflows (what `workflows/` ships) against a running ComfyUI's /object_info:
type-checking their links and turning them into the API form that /prompt executes."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the browser, never sent to the server


def shipped(number: str) -> dict:
    """The shipped workflow whose file name starts with `number` (its place in the template browser)."""
    (path,) = WORKFLOWS.glob(f"{number} *.json")
    return json.loads(path.read_text())


def shipped_before(number: str, commit: str) -> dict:
    """The workflow shipped as `number` at git `commit` (a workflow as users saved it then)."""
    import subprocess

    repo = WORKFLOWS.parent
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", commit, "workflows/"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    (name,) = [n for n in names if n.startswith(f"workflows/{number} ") and n.endswith(".json")]
    return json.loads(subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{name}"],
                                     capture_output=True, text=True, check=True).stdout)


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    spec = info["input"]
    return [(name, s) for part in ("required", "optional") for name, s in spec.get(part, {}).items()]


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def accepts(input_type: str, link_type: str) -> bool:
    if "*" in (input_type, link_type):
        return True
    return bool(set(input_type.split(",")) & set(link_type.split(",")))


def check_links(workflow: dict, object_info: dict) -> list[str]:
    """Problems with node types and links; empty when the workflow would load and connect."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in nodes.values():
        if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY:
            problems.append(f"node {n['id']}: unknown node type {n['type']}")
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        if nodes[src]["type"] not in object_info or nodes[dst]["type"] not in object_info:
            continue
        out_type = object_info[nodes[src]["type"]]["output"][src_slot]
        input_name = nodes[dst]["inputs"][dst_slot]["name"]
        specs = dict(ordered_inputs(object_info[nodes[dst]["type"]]))
        if input_name not in specs:
            problems.append(f"link {link_id}: {nodes[dst]['type']} has no input {input_name}")
            continue
        in_type = "COMBO" if isinstance(specs[input_name][0], list) else specs[input_name][0]
        if not accepts(out_type, link_type) or not accepts(in_type, out_type):
            problems.append(f"link {link_id}: {nodes[src]['type']} gives {out_type}, "
                            f"{nodes[dst]['type']}.{input_name} takes {in_type}")
    return problems


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-form prompt of a UI workflow (muted and bypassed nodes left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:
            continue
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = stored_widget_values(node, object_info[node["type"]])
        inputs = {}
        for name, spec in ordered_inputs(object_info[node["type"]]):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif values.get(name) is not None:
                inputs[name] = values[name]
        # As the frontend does, a saved link into an input the node no longer declares is sent too.
        for name, link_id in linked.items():
            inputs.setdefault(name, [str(links[link_id][1]), links[link_id][2]])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def stored_widget_values(node: dict, info: dict) -> dict:
    """A UI-format node's `widgets_values` by input name, as the server's schema `info` orders them: a linked
    widget keeps its slot; an input declared with control_after_generate is followed by its control's value
    (under `<input>.control_after_generate`)."""
    values = list(node.get("widgets_values") or [])
    named = {}
    for name, spec in ordered_inputs(info):
        if is_widget(spec) and values:
            named[name] = values.pop(0)
            if len(spec) > 1 and spec[1].get("control_after_generate") and values:
                named[name + ".control_after_generate"] = values.pop(0)
    return named


def inputs_of(prompt: dict, class_type: str) -> dict:
    """The inputs of the one node of `class_type` in an API-form prompt (to read or change them)."""
    found = [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"the prompt has {len(found)} {class_type} nodes, expected one")
    return found[0]
