"""Memory savings while training (block swap, checkpointing every k-th block, activations offloaded to the CPU):
the same losses and gradients as without them, the blocks' weights moved only where and when they should be,
and the model left as it was."""

from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan
from test_training import _quick, _subject_set

from custvid_core.backbones import describe
from custvid_core.backbones.memory import BlockSwap
from custvid_core.errors import InputError
from custvid_core.training import MemorySettings, MotionSettings, SubjectSettings, VideoSet, train_joint, train_subject

LAYERS = 4


def _backbone():
    backbone = describe(tiny_diffusers_wan(LAYERS))
    backbone.model.requires_grad_(False)  # as in training: the base is frozen
    return backbone


def _forward_backward(backbone, checkpointing=False, memory=MemorySettings()):
    """The velocity and the gradients of a loss on it with respect to the latents and the text context."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 8, 8, generator=g).requires_grad_()
    context = torch.randn(2, 5, 64, generator=g).requires_grad_()
    with backbone.training_memory(checkpointing, memory):
        v = backbone.forward(x, torch.tensor([0.3, 0.8]), context)
        v.square().mean().backward()
    return v.detach(), x.grad, context.grad


SAVINGS = [
    pytest.param(False, MemorySettings(blocks_to_swap=1), id="swap_1"),
    pytest.param(False, MemorySettings(blocks_to_swap=LAYERS), id="swap_all"),
    pytest.param(True, MemorySettings(blocks_to_swap=2), id="swap_2_checkpointing"),
    pytest.param(True, MemorySettings(recompute_every=2), id="every_2nd_block"),
    pytest.param(True, MemorySettings(recompute_every=3, blocks_to_swap=1), id="every_3rd_block_swap_1"),
    pytest.param(True, MemorySettings(offload_activations=True), id="checkpointing_offloaded"),
    pytest.param(False, MemorySettings(offload_activations=True), id="all_activations_offloaded"),
    pytest.param(True, MemorySettings(recompute_every=2, offload_activations=True, blocks_to_swap=2), id="all_three"),
]


@pytest.mark.parametrize("checkpointing, memory", SAVINGS)
def test_the_forward_and_its_gradients_are_unchanged(checkpointing, memory):
    backbone = _backbone()
    plain = _forward_backward(backbone)
    saved = _forward_backward(backbone, checkpointing, memory)
    for a, b in zip(plain, saved):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert all("forward" not in b.__dict__ for b in backbone.blocks)


@pytest.mark.parametrize("checkpointing, memory", SAVINGS)
def test_a_training_run_learns_the_same_lora(checkpointing, memory):
    backbone = describe(tiny_diffusers_wan(LAYERS))
    data = _subject_set()
    settings = _quick(SubjectSettings(rank=4, alignment_block=1), 3)
    plain = train_subject(backbone, data, settings)
    saved = train_subject(backbone, data, replace(settings, gradient_checkpointing=checkpointing, memory=memory))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in saved.history] == pytest.approx([r[key] for r in plain.history], abs=1e-5)
    for k, v in plain.tensors.items():
        assert torch.allclose(v, saved.tensors[k], atol=1e-5, rtol=0), k


def test_offloaded_activations_go_through_the_cpu_and_the_weights_do_not(monkeypatch):
    packed = []

    class Recorded(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(t), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recorded)
    backbone = _backbone()
    weights = {p.untyped_storage().data_ptr() for p in backbone.model.parameters()}
    counts = {}
    for checkpointing in (False, True):
        packed.clear()
        _forward_backward(backbone, checkpointing, MemorySettings(offload_activations=True))
        assert not any(t.untyped_storage().data_ptr() in weights for t in packed)
        counts[checkpointing] = len(packed)
    # Under checkpointing only the blocks' inputs are kept for backward.
    assert 0 < counts[True] < counts[False] / 4


class _CountedMoves:
    """Every move of a swapped tensor, made a copy (as a move to another device is), recorded."""

    def __init__(self, monkeypatch):
        self.moves: list[torch.Tensor] = []
        monkeypatch.setattr(BlockSwap, "_to", self._to)

    def _to(self, t, device, non_blocking=False):
        self.moves.append(t)
        return t.detach().clone()


def test_swapped_blocks_compute_with_device_copies_brought_in_for_each_forward_and_recomputation(monkeypatch):
    backbone = _backbone()
    counted = _CountedMoves(monkeypatch)
    params = {name: p for name, p in backbone.model.named_parameters()}
    before = {name: p.detach().clone() for name, p in params.items()}
    swapped = [backbone.blocks[i] for i in range(LAYERS - 2, LAYERS)]
    held = [t for b in swapped for t in [*b.parameters(), *b.buffers()]]
    seen = []  # the weight object each swapped block's first self-attention layer computed with

    def record(module, _args):
        seen.append(module.weight)

    hooks = [b.attn1.to_q.register_forward_pre_hook(record) for b in backbone.blocks]
    plain = _forward_backward(backbone)
    seen.clear()
    saved = _forward_backward(backbone, memory=MemorySettings(blocks_to_swap=2))
    for h in hooks:
        h.remove()
    # In: each held tensor once to the offload device, at each of the two swapped blocks' forward and its
    # recomputation in backward once to the device; out: once back.
    assert len(counted.moves) == len(held) * (1 + 2 + 1)
    assert {id(t) for t in counted.moves} == {id(t) for t in held}
    # Unswapped blocks computed with their own weights, swapped ones with copies (forward and recomputation).
    assert [w is b.attn1.to_q.weight for w, b in zip(seen, backbone.blocks)] == [True, True, False, False]
    assert len(seen) == LAYERS + 2 and not any(w is swapped[0].attn1.to_q.weight for w in seen[LAYERS:])
    for a, b in zip(plain, saved):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # The model keeps its parameter objects, values and flags.
    assert {name: p for name, p in backbone.model.named_parameters()} == params
    assert all(torch.equal(p, before[name]) and not p.requires_grad for name, p in params.items())


def test_a_run_moves_only_the_frozen_base_weights_and_keeps_the_lora_on_the_device_in_fp32(monkeypatch):
    backbone = describe(tiny_diffusers_wan(LAYERS))
    base = {id(t) for b in backbone.blocks for t in [*b.parameters(), *b.buffers()]}
    counted = _CountedMoves(monkeypatch)
    lora = []

    def look(step, total, record):
        lora.extend(p for name, p in backbone.model.named_parameters() if "lora" in name)

    settings = replace(_quick(SubjectSettings(rank=4, alignment_block=1), 1), memory=MemorySettings(blocks_to_swap=3))
    train_subject(backbone, _subject_set(), settings, progress=look)
    assert counted.moves and {id(t) for t in counted.moves} <= base
    assert lora and all(p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad for p in lora)


def test_a_joint_run_takes_the_more_saving_of_its_two_memory_settings(monkeypatch):
    backbone = describe(tiny_diffusers_wan(LAYERS))
    counted = _CountedMoves(monkeypatch)
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8), torch.randn(2, 5, 64))
    subject = _quick(SubjectSettings(rank=4, alignment_block=1, alignment_weight=0.0), 1)
    train_joint(backbone, _subject_set(), clips, replace(subject, memory=MemorySettings(blocks_to_swap=1)),
                replace(MotionSettings(rank=4, spatial_rank=0, alignment_weight=0.0), memory=MemorySettings(blocks_to_swap=2)),
                subject.optim)
    assert {id(t) for t in counted.moves} == {id(t) for b in backbone.blocks[-2:] for t in b.parameters()}


@pytest.mark.parametrize("memory, match", [
    (lambda: MemorySettings(blocks_to_swap=LAYERS + 1), "blocks_to_swap"),
    (lambda: MemorySettings(blocks_to_swap=-1), "blocks_to_swap"),
    (lambda: MemorySettings(recompute_every=0), "recompute_every"),
])
def test_impossible_memory_settings_are_refused_with_the_input_named(memory, match):
    backbone = _backbone()
    with pytest.raises(InputError, match=match):
        with backbone.training_memory(True, memory()):
            pass
    assert all("forward" not in b.__dict__ for b in backbone.blocks)


def test_a_run_resumes_the_checkpoint_of_a_run_with_other_memory_savings(tmp_path):
    backbone = describe(tiny_diffusers_wan(LAYERS))
    settings = _quick(SubjectSettings(rank=4, alignment_block=1), 2)
    train_subject(backbone, _subject_set(), settings, workdir=tmp_path)
    said = []
    more = replace(settings, optim=replace(settings.optim, steps=3), gradient_checkpointing=True,
                   memory=MemorySettings(recompute_every=2, offload_activations=True, blocks_to_swap=1))
    trained = train_subject(backbone, _subject_set(), more, workdir=tmp_path, log=said.append)
    assert said == ["resumed from step 2 of 3"] and len(trained.history) == 3


def test_a_failure_while_offloading_puts_back_what_had_moved(monkeypatch):
    block = tiny_diffusers_wan(2).blocks[1].requires_grad_(False)
    moves, failed = [], []

    def fake_to(self, t, device, non_blocking=False):  # the offload device is only a label: nothing goes there
        if len(moves) == 5 and not failed:
            failed.append(True)
            raise RuntimeError("out of memory")
        moves.append(device)
        return t.detach().clone()

    monkeypatch.setattr(BlockSwap, "_to", fake_to)
    with pytest.raises(RuntimeError, match="out of memory"):
        with BlockSwap([block], torch.device("cpu"), torch.device("meta")):
            pass
    held = len(list(block.parameters())) + len(list(block.buffers()))
    assert moves[:5] == [torch.device("meta")] * 5 and moves[5:] == [torch.device("cpu")] * held
