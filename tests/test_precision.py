"""Training computes in a chosen dtype, not in the dtype the base's weights are stored in: the data the model
sees is in the compute dtype, the LoRA stays fp32, and the base is neither upcast nor changed."""

import math

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import OptimSettings, SubjectSet, SubjectSettings, train_subject
from custvid_core.training.engine import compute_dtype
from custvid_core.training.objectives import SigmaSampler


def _photos():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    return SubjectSet(torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), masks)


SETTINGS = SubjectSettings(rank=4, alignment_weight=0.0, sigmas=SigmaSampler("uniform"),
                           optim=OptimSettings(steps=6, lr=1e-3, warmup=0))


def _train(weights_dtype, dtype=None):
    """Train on a tiny diffusers Wan stored in `weights_dtype`; returns the run, the dtypes of the latents and
    context the model was called with, the base's state before and after, and the LoRA's parameter dtypes."""
    backbone = describe(tiny_diffusers_wan().to(weights_dtype))
    seen = []
    backbone.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append((kwargs["hidden_states"].dtype, kwargs["encoder_hidden_states"].dtype)),
        with_kwargs=True)
    lora_dtypes = set()

    def progress(step, steps, record):
        lora_dtypes.update(p.dtype for n, p in backbone.model.named_parameters() if "lora_" in n)

    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trained = train_subject(backbone, _photos(), SETTINGS, progress=progress, **({"dtype": dtype} if dtype else {}))
    return trained, set(seen), before, backbone.model.state_dict(), lora_dtypes


def test_a_bf16_base_trains_on_fp32_data_on_the_cpu_with_an_fp32_lora():
    trained, seen, before, after, lora_dtypes = _train(torch.bfloat16)
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert seen == {(torch.float32, torch.float32)}  # not the weights' bf16
    assert lora_dtypes == {torch.float32}
    assert all(v.dtype == torch.float32 for v in trained.tensors.values())
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert all(math.isfinite(r["loss"]) for r in trained.history)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lower_compute_dtype_trains_an_fp32_base_without_touching_it_and_follows_fp32(dtype):
    reference = _train(torch.float32)[0]
    trained, seen, before, after, lora_dtypes = _train(torch.float32, dtype)
    assert seen == {(dtype, dtype)} and lora_dtypes == {torch.float32}
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    losses = torch.tensor([r["loss"] for r in trained.history])
    expected = torch.tensor([r["loss"] for r in reference.history])
    assert torch.allclose(losses, expected, rtol=0.02)
    # fp16's loss scale is divided out again: the gradients are the fp32 run's, not 1024 times them.
    norms = torch.tensor([r["grad_norm"] for r in trained.history])
    assert torch.allclose(norms, torch.tensor([r["grad_norm"] for r in reference.history]), rtol=0.1)


def test_a_compute_dtype_other_than_fp32_bf16_fp16_is_refused():
    with pytest.raises(InputError, match="training_dtype"):
        compute_dtype(torch.device("cpu"), torch.float8_e4m3fn)
