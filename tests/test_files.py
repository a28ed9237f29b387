import os
import pickle
import stat

import pytest
import torch

from custvid_core.adapters.embedding import LearnedTrigger, save_trigger_embedding
from custvid_core.errors import InputError
from custvid_core.files import atomic_path, load_safetensors, load_state_dict, path_inside, save_safetensors
from custvid_core.media import save_gif, save_mp4, save_png
from custvid_core.training.loop import OptimSettings, StepResult, train


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    path = save_safetensors(tmp_path / "a.safetensors", {"w": torch.arange(6.0).view(2, 3)},
                            {"name": "x", "config": {"dim": 4}})
    tensors, meta = load_safetensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).view(2, 3))
    assert meta == {"name": "x", "config": '{"dim": 4}'}


def test_corrupt_and_missing_files_name_the_input(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="my_input: 'bad.safetensors' is not a readable safetensors"):
        load_state_dict(bad, "my_input")
    with pytest.raises(InputError, match="my_input: file .* does not exist"):
        load_state_dict(tmp_path / "none.pt", "my_input")
    truncated = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(InputError, match="could not be read"):
        load_state_dict(truncated, "my_input")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_torch_files_load_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(InputError, match="weights-only"):
        load_state_dict(path, "ckpt")
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd", "a/../../b", "", "  ", "."])
def test_user_file_names_stay_inside_the_folder(tmp_path, name):
    with pytest.raises(InputError, match="file_name"):
        path_inside(tmp_path, name, "file_name")


def test_user_file_names_may_use_subfolders(tmp_path):
    assert path_inside(tmp_path, "sub/x.safetensors", "file_name") == (tmp_path / "sub" / "x.safetensors").resolve()


def _checkpoint(path):
    weight = torch.nn.Parameter(torch.ones(2))
    train(lambda step, g: StepResult((weight ** 2).sum()), {"w": [weight]}, OptimSettings(steps=1, warmup=0),
          workdir=path.parent)
    return path.parent / "checkpoint.pt"


FRAMES = torch.rand(3, 8, 10, 3)
WRITERS = {  # every kind of file the library writes, each through its own writer
    "weights": lambda p: save_safetensors(p.with_suffix(".safetensors"), {"w": torch.ones(2)}),
    "trigger_embedding": lambda p: save_trigger_embedding(p.with_suffix(".safetensors"),
                                                          LearnedTrigger(torch.ones(1, 4), "sks")),
    "training_checkpoint": _checkpoint,
    "png": lambda p: save_png(FRAMES[0], p.with_suffix(".png")),
    "gif": lambda p: save_gif(FRAMES, p.with_suffix(".gif")),
    "mp4": lambda p: save_mp4(FRAMES, p.with_suffix(".mp4")),
}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("kind", WRITERS)
def test_saved_files_get_the_usual_permissions(tmp_path, umask_022, kind):
    """0666 less the umask (0644 here), as any program's files: not the owner-only 0600 of a temporary file."""
    path = WRITERS[kind](tmp_path / "sub" / "out")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_atomic_path_follows_the_umask_without_changing_it(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        # ComfyUI writes files from several threads: setting the process umask, even for a moment,
        # would give another thread's new files the wrong permissions.
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("atomic_path changed the process umask"))
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
