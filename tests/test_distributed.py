"""Training on several processes (accelerate, gloo on this machine's CPUs) learns what one process learns.

A tiny Wan subject LoRA run (photos with masks and DINOv2 tokens, preservation clips in turn, batch 2) runs in
this process and under `accelerate launch --multi_gpu --num_processes 2` (this file is the launched script). Every
process draws the whole batch from the shared seeded generator and computes its half, so the runs see the same
global batch; they differ only in float summation order (a forward over 1 row instead of 2, the all-reduce's
sums), hence a tolerance of 1e-5 (relative) on the losses and gradient norms where the recorded curves use 1e-6
for identical arithmetic, and a hundredth of a learning-rate step on each LoRA weight (`LORA_TOLERANCE`). The masks
differ in area, so the masked region loss of a half must be weighed by its part of the whole batch's mask.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custvid_core.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
TOLERANCE = 1e-5
LR = 1e-3
# AdamW divides each gradient element by its running RMS, so the last bits of a small gradient element (the
# cross-attention's q early on) can move its weight by a visible share of a step, at most `LR`: each LoRA weight
# may differ by a hundredth of a step.
LORA_TOLERANCE = 0.01 * LR


def _subject_set():
    from custvid_core.training import SubjectSet, VideoSet

    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(4, 1, 1, 8, 8)
    for i in range(4):  # of different areas: the region loss of a share is weighed by its part of the batch's mask
        masks[i, ..., 2:4 + i, 1:5] = 1
    clips = VideoSet(torch.randn(3, 16, 2, 8, 8, generator=g), torch.randn(3, 5, 64, generator=g))
    return SubjectSet(torch.randn(4, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), masks,
                      torch.randn(4, 24, 5, 5, generator=g), clips, subject_tokens=(1, 2), trigger_words="sks")


def _train(steps: int, workdir: str | None = None, strategy: str = "ddp") -> dict:
    """The tiny run's loss history and LoRA, what it logged and how often it reported progress (in this process:
    the only one, or one of the launched ones), and whether the model came back as it was handed over (its blocks'
    classes, parameter objects and values). The constant schedule makes a run stopped after k steps the first
    k steps of a longer one, so a resumed run can be compared with an uninterrupted one."""
    from builders import tiny_diffusers_wan

    from custvid_core.backbones import describe
    from custvid_core.training import OptimSettings, SubjectSettings, train_subject
    from custvid_core.training.distributed import strategy_used

    settings = SubjectSettings(rank=4, alignment_block=1, projector_hidden=32, batch=2,
                               optim=OptimSettings(steps=steps, lr=LR, warmup=2, schedule="constant", checkpoint_every=2))
    logged, reports, sharded = [], [], []
    model = tiny_diffusers_wan()
    before = [(type(m), [(n, p, p.detach().clone()) for n, p in m.named_parameters()]) for m in model.blocks]
    # After each forward of the model, before its backward: whether its blocks are held as shards.
    model.register_forward_hook(lambda *_: sharded.append(_is_sharded(model)))
    with strategy_used(strategy):
        trained = train_subject(describe(model), _subject_set(), settings, workdir=workdir,
                                progress=lambda *a: reports.append(a[0]), log=logged.append)
    restored = all(type(m) is cls and [(n, p) for n, p, _ in params] == list(m.named_parameters())
                   and all(type(p) is torch.nn.Parameter and torch.equal(p, value) for _, p, value in params)
                   for m, (cls, params) in zip(model.blocks, before))
    return {"history": [{k: v for k, v in r.items() if k != "seconds"} for r in trained.history],
            "lora": {k: v.tolist() for k, v in sorted(trained.tensors.items())}, "log": logged, "progress": reports,
            "restored": restored, "sharded": sharded}


def _is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for m in model.blocks for p in m.parameters())


def _launched(tmp_path: Path, processes: int, steps: int, workdir: Path | None = None, strategy: str = "ddp") -> list[dict]:
    """`_train` under `accelerate launch` with `processes` CPU processes; each process's result."""
    out = tmp_path / f"run{processes}_{steps}_{strategy}"
    _launch(processes, [__file__, str(out), str(steps), str(workdir or ""), strategy])
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(processes)]


def _launch(processes: int, script: list[str]) -> str:
    """Run `script` (a file or -m module, and its arguments) under `accelerate launch`; its standard output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launches through MPI; its torchrun launcher (--multi_gpu) starts CPU processes as well.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _assert_same(got: dict, expected: dict):
    assert len(got["history"]) == len(expected["history"])
    for a, b in zip(got["history"], expected["history"]):
        assert set(a) == set(b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=TOLERANCE, abs=1e-7), f"step {a['step']}, {k}: {a[k]} != {b[k]}"
    losses = [(a["loss"], b["loss"]) for a, b in zip(got["history"], expected["history"])]
    print(f"largest relative loss difference: {max(abs(a / b - 1) for a, b in losses):.3g}")
    worst = max(float((torch.tensor(got["lora"][name]) - torch.tensor(expected["lora"][name])).abs().max())
                for name in expected["lora"])
    print(f"largest LoRA weight difference: {worst:.3g}")
    assert worst <= LORA_TOLERANCE, f"a LoRA weight differs by {worst}, {worst / LR:.3g} of a step"


@pytest.fixture(scope="module")
def alone() -> dict:
    """The one-process run, uninterrupted."""
    return _train(STEPS)


def test_two_processes_learn_the_one_process_curve(tmp_path, alone):
    main, other = _launched(tmp_path, 2, STEPS)
    _assert_same(main, alone)
    assert main["history"][0]["loss"] != main["history"][-1]["loss"]  # the run learns: the comparison means something
    assert main["progress"] == list(range(1, STEPS + 1)) and other["progress"] == [] and other["log"] == []


def test_gradient_accumulation_of_two_halves_learns_the_whole_batch(monkeypatch, alone):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")  # as `accelerate launch` sets it
    _assert_same(_train(STEPS), alone)


def test_a_batch_that_does_not_share_out_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(InputError, match="batch.*multiple of 4"):
        _train(1)


def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path, alone):
    _launched(tmp_path, 2, STEPS - 2, tmp_path)
    resumed = _train(STEPS, str(tmp_path))
    assert resumed["log"] == [f"resumed from step {STEPS - 2} of {STEPS}"]
    _assert_same(resumed, alone)


def test_a_checkpoint_of_one_process_resumes_on_two(tmp_path, alone):
    _train(STEPS - 2, str(tmp_path))
    main, other = _launched(tmp_path, 2, STEPS, tmp_path)
    assert main["log"] == [f"resumed from step {STEPS - 2} of {STEPS}"]
    _assert_same(main, alone)
    _assert_same(other, alone)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_train_command_on_two_processes_learns_the_one_process_lora(tmp_path, strategy):
    from test_train_config import SUBJECT, tiny_pipeline, write_data

    from custvid_core.adapters.lora import read_lora
    from custvid_core.cli import main

    tiny_pipeline(tmp_path / "wan")
    write_data(tmp_path)
    text = SUBJECT.replace("rank = 4", "rank = 4\nbatch = 2")  # a batch the 2 processes share
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(text.replace('folder = "out_subject"', f'folder = "{name}"')
                                               + (f'\n[distributed]\nstrategy = "{strategy}"\n' if name == "two" else ""))
    assert main(["train", str(tmp_path / "one.toml")]) == 0
    printed = _launch(2, ["-m", "custvid_core", "train", str(tmp_path / "two.toml")])
    assert printed.count('"lora":') == 1  # the main process says what it wrote; the other is silent
    history = [json.loads((tmp_path / name / "my_dog_history.json").read_text()) for name in ("two", "one")]
    loras = [{k: v.tolist() for k, v in read_lora(tmp_path / name / "my_dog.safetensors")[0].items()}
             for name in ("two", "one")]
    _assert_same(*({"history": [{k: v for k, v in r.items() if k != "seconds"} for r in h], "lora": lora}
                   for h, lora in zip(history, loras)))


def test_an_unknown_strategy_is_refused(tmp_path):
    from test_train_config import SUBJECT, write_data

    from custvid_core.training.config import load_config

    write_data(tmp_path)
    (tmp_path / "wan").mkdir()  # checked to exist, not read
    (tmp_path / "run.toml").write_text(SUBJECT + '\n[distributed]\nstrategy = "zero3"\n')
    with pytest.raises(InputError, match=r"\[distributed\] strategy.*'zero3'.*ddp, fsdp"):
        load_config(tmp_path / "run.toml")


def test_accelerates_own_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --use_fsdp` sets it
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")  # a session on this one process
    with pytest.raises(InputError, match="--use_fsdp.*strategy = \"fsdp\""):
        _train(1)


def test_fsdp_learns_the_ddp_lora_and_gives_the_model_back(tmp_path):
    """FSDP shards every block (base weights and LoRA) over the 2 processes; the projector stays replicated. The
    same arithmetic as DDP up to summation order (the shards' reduce-scatter, the norm of the gradients summed per
    shard), so the same tolerances as 1 against 2 processes."""
    ddp = _launched(tmp_path, 2, STEPS)
    fsdp = _launched(tmp_path, 2, STEPS, strategy="fsdp")
    assert len(fsdp[0]["sharded"]) >= STEPS and all(fsdp[0]["sharded"]) and not any(ddp[0]["sharded"])
    for result in fsdp:
        _assert_same(result, ddp[0])
        assert result["restored"]
    assert fsdp[1]["log"] == [] and fsdp[1]["progress"] == []


def test_a_checkpoint_of_fsdp_resumes_on_one_process(tmp_path, alone):
    _launched(tmp_path, 2, STEPS - 2, tmp_path, strategy="fsdp")
    resumed = _train(STEPS, str(tmp_path))
    assert resumed["log"] == [f"resumed from step {STEPS - 2} of {STEPS}"]
    _assert_same(resumed, alone)


def test_a_checkpoint_of_one_process_resumes_on_fsdp(tmp_path, alone):
    _train(STEPS - 2, str(tmp_path))
    main, other = _launched(tmp_path, 2, STEPS, tmp_path, strategy="fsdp")
    assert main["log"] == [f"resumed from step {STEPS - 2} of {STEPS}"] and main["sharded"] and all(main["sharded"])
    _assert_same(main, alone)
    _assert_same(other, alone)


@pytest.mark.parametrize("setting, value, named", [("memory", {"blocks_to_swap": 1}, "blocks_to_swap"),
                                                   ("dtype", torch.float16, "training_dtype")])
def test_what_fsdp_cannot_run_is_refused(monkeypatch, setting, value, named):
    from builders import tiny_diffusers_wan

    from custvid_core.backbones import describe
    from custvid_core.backbones.memory import MemorySettings
    from custvid_core.training import SubjectSettings, train_subject
    from custvid_core.training.distributed import strategy_used

    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it; the refusal comes before any process group
    memory = MemorySettings(**value) if setting == "memory" else MemorySettings()
    settings = SubjectSettings(rank=4, alignment_block=1, projector_hidden=32, batch=2, memory=memory)
    with strategy_used("fsdp"), pytest.raises(InputError, match=f"{named}.*fsdp"):
        train_subject(describe(tiny_diffusers_wan()), _subject_set(), settings,
                      **({"dtype": value} if setting == "dtype" else {}))


if __name__ == "__main__":
    out, steps, workdir, strategy = sys.argv[1:]
    result = _train(int(steps), workdir or None, strategy)
    Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(result))
