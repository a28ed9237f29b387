# Standalone set-up and commands (no ComfyUI needed). Each target creates .venv on first use.
# Inside ComfyUI none of this is needed: ComfyUI Manager installs requirements.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build used for development and CI; requirements.txt never pins torch (ComfyUI owns it).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## The main job: learn a case's subject and motion on the shapes world, then the base model's clip and the
## customized clip for the same prompt, side by side and measured (a few minutes on a CPU).
demo: $(VENV)/.installed
	$(PY) -m custvid_core demo --out out/demo

## The test suite. Host tests also run when COMFYUI_PATH points at a ComfyUI checkout.
test: $(VENV)/.installed
	$(PY) -m pytest
