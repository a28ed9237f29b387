"""ComfyUI's side of the sampling contract (`custvid_core/control/sampling.py`).

ComfyUI tells a model call its noise level, the whole schedule (`sample_sigmas`) and which chunks of the batch
are conditional (`cond_or_uncond`); `comfy_step` turns that into the same `SamplingStep` the world's sampler
makes. `drive_controls` makes a model's sampling call the controls' `before_step` at every model call and their
`attention_edit` in Wan's text cross-attention. (`after_step` needs a sampler that stops between steps: the
camera's KSAMPLER in control_nodes.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.patcher_extension
import torch

from ..custvid_core.control.sampling import (
    Controls,
    CrossAttentionCall,
    SamplingControl,
    SamplingStep,
    attend_edited,
    conditional_rows,
)

# Where a model call's wrapper leaves the call's description for the attention override.
MODEL_CALL = "custvid_model_call"


@dataclass(frozen=True)
class ModelCall:
    """One call of the diffusion model: its step, the token grid of its latent and its text context's length."""

    step: SamplingStep
    grid: tuple[int, int, int]
    text_length: int | None


def comfy_step(sigma: torch.Tensor, transformer_options: dict, batch: int) -> SamplingStep:
    """The step of a model call at `sigma` on a batch of `batch` rows, as ComfyUI's sampling describes it."""
    rows = conditional_rows(transformer_options.get("cond_or_uncond") or [0], batch)
    return SamplingStep.at_sigma(float(sigma.max()), transformer_options.get("sample_sigmas"), rows)


def drive_controls(model, controls: list[SamplingControl], key: str):
    """A clone of `model` whose sampling drives `controls` (its caller may patch the clone further). `key` names
    the patch among the model's wrappers."""
    patched = model.clone()
    control = Controls(controls)
    patch_size = getattr(patched.get_model_object("diffusion_model"), "patch_size", (1, 2, 2))

    def at_model_call(executor, x, t, c_concat, c_crossattn, control_net, transformer_options, **kwargs):
        step = comfy_step(t, transformer_options, x.shape[0])
        control.before_step(step)
        transformer_options[MODEL_CALL] = ModelCall(
            step, tuple(math.ceil(n / p) for n, p in zip(x.shape[2:], patch_size)),
            c_crossattn.shape[1] if torch.is_tensor(c_crossattn) else None)
        return executor(x, t, c_concat, c_crossattn, control_net, transformer_options, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, at_model_call)
    if control.edits_attention:
        _edit_text_cross_attention(patched, control)
    return patched


def _edit_text_cross_attention(patched, control: Controls) -> None:
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get("optimized_attention_override")

    def attention(func, *args, **kwargs):
        def call(q, k, v, mask):
            rest = dict(kwargs)
            if mask is not None:
                rest["mask"] = mask.to(q.dtype)
            if previous is not None:
                return previous(func, q, k, v, *args[3:], **rest)
            return func(q, k, v, *args[3:], **rest)

        q, k, v = args[:3]
        model_call = (kwargs.get("transformer_options") or {}).get(MODEL_CALL)
        # Edited: Wan's text cross-attention (keys as long as the text context, not an image-to-video
        # model's CLIP image tokens; no mask of its own).
        if (model_call is None or k.shape[1] != model_call.text_length or k.shape[1] == q.shape[1]
                or q.shape[1] != math.prod(model_call.grid) or kwargs.get("mask") is not None):
            return call(q, k, v, None)
        block = kwargs["transformer_options"].get("block_index", -1)
        edits = control.attention_edit(model_call.step,
                                       CrossAttentionCall(block, model_call.grid, k.shape[1], q.dtype, q.device))
        if not edits:
            return call(q, k, v, None)
        return attend_edited(call, q, k, v, edits)

    options["optimized_attention_override"] = attention
