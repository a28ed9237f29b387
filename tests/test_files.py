import pickle

import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.files import atomic_path, load_safetensors, load_state_dict, path_inside, save_safetensors


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
