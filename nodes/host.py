"""Glue to ComfyUI's services: model folders, memory management, progress bars."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

# folder name -> sub-path of ComfyUI's models folder. Users can add more paths for the same
# names in extra_model_paths.yaml.
MODEL_FOLDERS = {
    "custvid_dino": os.path.join("custvid", "dino"),
    "custvid_raft": os.path.join("custvid", "raft"),
    "custvid_representations": os.path.join("custvid", "representations"),
}


# The shapes world ships inside the pack: its Wan file is offered by ComfyUI's own UNETLoader.
WORLD_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custvid_core", "world",
                             "weights")


def _register(name: str, path: str, is_default: bool) -> None:
    folder_paths.add_model_folder_path(name, path, is_default=is_default)
    paths, extensions = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (paths, extensions or set(folder_paths.supported_pt_extensions))


def register_model_folders() -> None:
    for name, sub in MODEL_FOLDERS.items():
        _register(name, os.path.join(folder_paths.models_dir, sub), is_default=True)
    _register("custvid_world_text", os.path.join(WORLD_WEIGHTS, "text_encoders"), is_default=False)
    _register("diffusion_models", os.path.join(WORLD_WEIGHTS, "diffusion_models"), is_default=False)


def model_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def default_folder(folder: str) -> str:
    return folder_paths.get_folder_paths(folder)[0]


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A core `progress(done, total)` callback driving a ComfyUI progress bar (also the interrupt point)."""
    bar = comfy.utils.ProgressBar(total)
    return lambda done, new_total: bar.update_absolute(done, new_total)


class _ModuleHolder(torch.nn.Module):
    """ModelPatcher writes attributes such as `device` on the module it manages; transformers
    models make `device` read-only, so the patcher manages this holder instead."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


@dataclass
class ManagedModel:
    """A core model object (e.g. a DinoEncoder) whose nn.Module ComfyUI's memory manager moves."""

    core: Any
    patcher: comfy.model_patcher.ModelPatcher

    @classmethod
    def wrap(cls, core: Any, module, dtype=None) -> "ManagedModel":
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        if dtype is not None:
            module.to(dtype)
        module.to(offload_device)
        patcher = comfy.model_patcher.ModelPatcher(_ModuleHolder(module), load_device=load_device,
                                                   offload_device=offload_device)
        return cls(core, patcher)

    def load(self):
        """Put the model on the compute device, letting ComfyUI free memory for it first."""
        comfy.model_management.load_models_gpu([self.patcher])
        return self.core
