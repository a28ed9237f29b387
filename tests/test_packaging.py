"""What ComfyUI Manager, the registry and CI rely on."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_equal_pyproject_dependencies_and_leave_torch_to_the_host():
    assert sorted(requirement_lines()) == sorted(pyproject()["project"]["dependencies"])
    names = {re.split(r"[<>=!~ \[]", line)[0].lower() for line in requirement_lines()}
    assert not names & {"torch", "torchvision", "torchaudio"}


def test_registry_metadata():
    project, comfy = pyproject()["project"], pyproject()["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy


def test_ci_runs_the_test_command_readme_gives():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, re.M)
    assert "make test" in commands and "make demo" in commands
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_importing_the_library_and_what_nodes_use_stays_light():
    code = ("import sys, custvid_core, custvid_core.files, custvid_core.backbones, "
            "custvid_core.representations.subject, custvid_core.representations.motion, "
            "custvid_core.representations.storage\n"
            "heavy = {'transformers', 'diffusers', 'comfy', 'torchvision', 'peft', 'av'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
