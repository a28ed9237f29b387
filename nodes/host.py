"""Glue to ComfyUI's services: model folders, memory management, progress bars."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..custvid_core.control.boxes import TokenRoles, word_positions
from ..custvid_core.errors import InputError

# folder name -> sub-path of ComfyUI's models folder. Users can add more paths for the same
# names in extra_model_paths.yaml.
MODEL_FOLDERS = {
    "custvid_dino": os.path.join("custvid", "dino"),
    "custvid_raft": os.path.join("custvid", "raft"),
    "custvid_representations": os.path.join("custvid", "representations"),
    "custvid_trigger_embeddings": os.path.join("custvid", "trigger_embeddings"),
    "custvid_dualreal": os.path.join("custvid", "dualreal"),
    "custvid_synmotion": os.path.join("custvid", "synmotion"),
    "custvid_clip": os.path.join("custvid", "clip"),
    "custvid_datasets": os.path.join("custvid", "datasets"),
}


# The shapes world ships inside the pack: its Wan file is offered by ComfyUI's own UNETLoader, its
# encoders by Load DINOv2 and Load RAFT.
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
    _register("custvid_dino", os.path.join(WORLD_WEIGHTS, "dino"), is_default=False)
    _register("custvid_raft", os.path.join(WORLD_WEIGHTS, "raft"), is_default=False)
    _register("diffusion_models", os.path.join(WORLD_WEIGHTS, "diffusion_models"), is_default=False)


# Conditioning key under which a text encoder says how its model's latents hold time, when not as Wan's video
# latents do (one latent frame per time step): an object with `frames(latent_frames)`, `as_frames(latent)` and
# `from_frames(frames, latent)`. The shapes world's clip sets it; the camera sampler reads it.
LATENT_LAYOUT = "custvid_latent_layout"


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


_rope_backward_registered = False


def enable_rope_backward() -> None:
    """comfy-kitchen's fused RoPE op has no backward; register one so LoRA training through ComfyUI's
    Wan works. RoPE rotates pairs by 2x2 matrices, so the gradient is the same op with the matrices
    transposed. Forward results are untouched; without comfy-kitchen ComfyUI's torch RoPE is used."""
    global _rope_backward_registered
    if _rope_backward_registered:
        return
    _rope_backward_registered = True
    op = getattr(getattr(torch.ops, "comfy_kitchen", None), "apply_rope1", None)
    if op is None:
        return

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return op(grad.contiguous(), freqs.transpose(-1, -2).contiguous()), None

    try:
        torch.library.register_autograd("comfy_kitchen::apply_rope1", backward, setup_context=setup_context)
    except RuntimeError:  # a newer comfy-kitchen that has its own backward
        pass


@contextmanager
def training_backbone(model) -> Iterator[tuple[Any, torch.device, Callable[[torch.Tensor], torch.Tensor]]]:
    """The user's MODEL, loaded through a clone for a training run: yields its Wan description, the
    compute device, and the latent normalisation the model applies to VAE latents. ComfyUI runs
    nodes under inference mode; training needs it off. Stock LoRAs already on the MODEL are part
    of the weights being adapted. The weights stay in the precision they were loaded in; inside, every
    layer casts them to the training dtype as it runs."""
    with training_clone(model) as (_, backbone, device, to_model):
        yield backbone, device, to_model


@contextmanager
def training_clone(model) -> Iterator[tuple[Any, Any, torch.device, Callable[[torch.Tensor], torch.Tensor]]]:
    """`training_backbone`, also yielding first the loaded clone itself: ComfyUI's sampler samples it with the
    run's adapters (previews) without loading the model again."""
    from ..custvid_core.backbones import describe

    enable_rope_backward()
    clone = model.clone()
    backbone = describe(clone.model.diffusion_model)
    comfy.model_management.load_models_gpu([clone])
    with torch.inference_mode(False), torch.enable_grad(), _casting_weights(clone.model.diffusion_model):
        _usable_by_autograd(clone.model.diffusion_model)
        yield clone, backbone, clone.load_device, clone.model.process_latent_in


def offload_device() -> torch.device:
    """Where ComfyUI keeps a model's weights off the GPU: CPU memory (the GPU itself with --gpu-only or --highvram)."""
    return comfy.model_management.unet_offload_device()


TRAINING_DTYPES = ("auto", "fp32", "bf16", "fp16")


def resolve_training_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a training run on `device`. auto: bf16 where ComfyUI finds the device good at it,
    else fp32 (fp16 only when chosen: it trains with a loss scale and may overflow)."""
    from ..custvid_core.training.engine import TRAINING_DTYPES as DTYPES

    if choice == "auto":
        use_bf16 = comfy.model_management.should_use_bf16(device, prioritize_performance=False)
        return torch.bfloat16 if use_bf16 else torch.float32
    if choice not in DTYPES:
        raise InputError("training_dtype", f"'{choice}'", f"one of {', '.join(TRAINING_DTYPES)}")
    return DTYPES[choice]


@contextmanager
def _casting_weights(module: torch.nn.Module) -> Iterator[None]:
    """ComfyUI's layers cast their weights to the input's dtype when `comfy_cast_weights` is set (as for fp8
    weights, low-VRAM loading and LoRA patches). Training turns it on for every layer, so the model computes
    in the training dtype from weights stored in any precision (fp8, scaled fp8, fp16) without a full-precision
    copy of the model; each layer's flag is put back after."""
    import comfy.ops

    layers = [m for m in module.modules() if isinstance(m, comfy.ops.CastWeightBiasOp) and not m.comfy_cast_weights]
    own = {m: m.__dict__["comfy_cast_weights"] for m in layers if "comfy_cast_weights" in m.__dict__}
    for m in layers:
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        for m in layers:
            if m in own:
                m.comfy_cast_weights = own[m]
            else:
                del m.comfy_cast_weights


def base_model_signature(model) -> str:
    """What a training run's checkpoint records as its base model: the MODEL's weights and the LoRAs applied to
    it (a LoRA trained on top of stock LoRAs learns against them). Call it while the model is loaded: the weights
    those LoRAs patch are then read by name and shape only, as loading may have merged the LoRAs into them."""
    from ..custvid_core.training.fingerprint import WEIGHT_SAMPLE, content_digest, model_signature

    prefix = "diffusion_model."
    patched = {k[len(prefix):] for k in model.patches if k.startswith(prefix)}
    return content_digest(model_signature(model.model.diffusion_model, patched), model.patches, sample=WEIGHT_SAMPLE)


def _usable_by_autograd(module: torch.nn.Module) -> None:
    """Weights loaded under ComfyUI's inference mode cannot be saved for backward; replace each such
    tensor by an ordinary copy with the same values and dtype (outputs are unchanged). Quantized weights (a
    tensor subclass, from scaled-fp8 files) stay: they are dequantized into a new tensor at every use, so
    autograd never saves them, and a copy would keep their inner data an inference tensor."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference() and type(p.data) is torch.Tensor:
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def decoder_with_grad(vae, latent_out: Callable[[torch.Tensor], torch.Tensor], raft, window: int):
    """MoRA's decoded-flow alignment through the user's VAE: decodes the model's clean-latent prediction
    to frames with gradients and measures them with the RAFT from Load RAFT. ComfyUI's VAE decodes under
    no_grad with weights made under inference mode, so a private copy of its model is used; the user's
    VAE is untouched. `latent_out`: the model's latent space -> the VAE's."""
    from ..custvid_core.training.objectives import DecodedFlow

    if hasattr(vae, "decode_with_grad"):  # the pack's own exact maps (the shapes world)
        decode, frames = vae.decode_with_grad, vae.pixel_frames
    else:
        ratio = getattr(vae, "upscale_ratio", None)
        if getattr(vae, "latent_dim", 2) != 3 or not isinstance(ratio, tuple) or not callable(ratio[0]):
            raise InputError("vae", "is not a video VAE", "the Wan VAE of the model you train")
        comfy.model_management.load_models_gpu([vae.patcher])
        with torch.inference_mode(False):
            model = copy.deepcopy(vae.first_stage_model)
            _usable_by_autograd(model)
        model.requires_grad_(False)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            pixels = model.decode(latents.to(vae.vae_dtype))
            return vae.process_output(pixels.float()).movedim(1, -1)

        frames = DecodedFlow.causal_frames(ratio[0](2) - ratio[0](1))
    return DecodedFlow(lambda z: decode(latent_out(z)), raft.load(), frames, window=window)


def plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy usable by autograd (tensors made under ComfyUI's inference mode are not)."""
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.clone()


def safetensors_path(folder: str, name: str, input_name: str, overwrite: bool = True) -> tuple[str, Path]:
    """Where a file name a user typed goes in one of ComfyUI's model folders (its first path):
    `.safetensors` added, kept inside the folder, and an existing file refused unless `overwrite`.
    Returns the folder and the path."""
    from ..custvid_core.files import path_inside

    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    if not stem.replace("\\", "/").rsplit("/", 1)[-1].strip(". "):  # '', '  ', '.', '..': no name
        raise InputError(input_name, f"'{name}' has no file name", "a file name such as 'custvid/my_subject'")
    name = f"{stem}.safetensors"
    root = default_folder(folder)
    path = path_inside(root, name, input_name)
    if path.exists() and not overwrite:
        raise InputError(input_name, f"'{name}' already exists in {root}",
                         "another name, or overwrite turned on")
    return root, path


def training_folder(run_name: str) -> str:
    """output/custvid_training/<run_name>: where a run's checkpoint lives, so a rerun resumes it."""
    from ..custvid_core.files import path_inside

    root = os.path.join(folder_paths.get_output_directory(), "custvid_training")
    return str(path_inside(root, run_name, "run_name"))


def show_on_node(text: str) -> None:
    """Text under the running node in ComfyUI's frontend (its progress-text preview, which any node may use).
    Only where ComfyUI's server runs (it has imported its `server` module); elsewhere, nothing."""
    import sys

    from comfy_execution.utils import get_executing_context

    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    context = get_executing_context()
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id, server.client_id)


def training_progress(total: int, label: str) -> Callable[[int, int, dict], None]:
    """Progress bar (also ComfyUI's interrupt point) and a console line with loss and seconds per step."""
    import logging

    bar = comfy.utils.ProgressBar(total)

    def progress(step: int, steps: int, record: dict) -> None:
        if step == 1 or step % 10 == 0 or step == steps:
            logging.info(f"CustVid {label}: step {step}/{steps} loss {record['loss']:.4f} "
                         f"{record['seconds']:.2f}s/step")
        bar.update_absolute(step, steps)

    return progress


def prompt_tokens(clip, text: str) -> list:
    """`text`'s tokens by the text encoder's own tokenizer (ComfyUI's CLIP object), one per conditioning row, the
    start, end and padding tokens included."""
    def key(token):
        # A textual-inversion embedding (`embedding:name`, e.g. a learned placeholder) takes one context
        # position per vector; its vectors are keyed by value so the same embedding is found again.
        return ("embedding", token.float().numpy().tobytes()) if torch.is_tensor(token) else int(token)

    tokenized = clip.tokenize(text)
    name = next(iter(tokenized))
    return [key(t[0]) for batch in tokenized[name] for t in batch]


def _special_tokens(clip) -> set:
    name = next(iter(clip.tokenize("")))
    inner = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", name), None)
    return {getattr(inner, a, None) for a in ("start_token", "end_token", "pad_token")} - {None}


def word_tokens(clip, words: str, input_name: str) -> dict[str, list]:
    """Each of `words`' tokens as the tokenizer gives the word alone, without start, end and padding tokens; a word
    the tokenizer refuses (a closed vocabulary, the shapes world's) is refused naming `input_name`."""
    special = _special_tokens(clip)
    try:
        return {w: [t for t in prompt_tokens(clip, w) if t not in special] for w in words.split()}
    except ValueError as e:  # an InputError, possibly of another import of custvid_core
        if not hasattr(e, "input_name"):
            raise
        raise InputError(input_name, e.problem, e.expected) from None


def token_roles(prompt: str, subject_words: str, clip=None, background_words: str = "",
                words_input: str = "subject_words"):
    """Context positions of the subject (and background) words of `prompt`, found with the text encoder's
    own tokenizer (ComfyUI's CLIP object, the shapes world's included)."""
    if not subject_words.strip():
        raise InputError(words_input, "it is empty", "the subject's words as they appear in the prompt")
    if clip is None:
        raise InputError("clip", "it is not connected", "the text encoder that encoded the prompt")
    ids = prompt_tokens(clip, prompt)
    special = _special_tokens(clip)

    def find(words: str, input_name: str) -> tuple[int, ...]:
        return word_positions(ids, word_tokens(clip, words, input_name), input_name, prompt)

    return TokenRoles(find(subject_words, words_input), tuple(i for i, t in enumerate(ids) if t not in special),
                      find(background_words, "background_words") if background_words.strip() else ())


def attached_per_call(model, parts: list, key: str, on_enter: Callable[[], None] | None = None):
    """A clone of `model` on which every call of the diffusion model runs with `parts` (custvid_core parts)
    attached, and detached after it, so the diffusion model the clone shares with other MODELs never keeps them;
    the input MODEL is not changed. Parts that build a module build it in the call's dtype (as training's autocast
    computes them; a loaded one keeps it for the next call). `on_enter`: what to set on the parts after attaching
    (e.g. a condition)."""
    import comfy.patcher_extension

    from ..custvid_core.adapters.parts import ModulePart, attached
    from ..custvid_core.backbones import describe

    def around_call(executor, x, *args, **kwargs):
        for part in parts:
            if isinstance(part, ModulePart):
                part.dtype = x.dtype
        with attached(describe(executor.class_obj), parts, x.device):
            if on_enter is not None:
                on_enter()
            return executor(x, *args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"{key}_{id(parts)}", around_call)
    return patched
