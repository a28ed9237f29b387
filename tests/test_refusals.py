"""Inputs the library refuses with a message naming them, where it used to go on or fail with a raw error."""

import json
import pickle

import pytest
import torch
from builders import TINY_DINO

from custvid_core.control.strength import StrengthSchedule
from custvid_core.errors import InputError
from custvid_core.files import load_state_dict, path_inside
from custvid_core.representations.subject import build_dinov2, load_dinov2


@pytest.mark.parametrize("name, problem", [
    ("a\0b", "holds a NUL character"),
    ("x" * 256, "is 256 bytes long"),
    ("sub/" + "é" * 128, "is 256 bytes long"),  # bytes, not characters
    ("   ", "the file name is empty"),
])
def test_names_no_file_system_takes_are_refused(tmp_path, name, problem):
    with pytest.raises(InputError, match=f"^file_name: .*{problem}"):
        path_inside(tmp_path, name, "file_name")
    assert path_inside(tmp_path, "x" * 255, "file_name").name == "x" * 255


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "0:0.6, 0.3:nan", "0:1, nan:2"])
def test_a_schedule_of_nan_or_inf_is_refused(text):
    with pytest.raises(InputError, match="finite numbers|increasing starts"):
        StrengthSchedule.parse(text)


@pytest.mark.parametrize("text", ["0.5: nan, 0", "0.5: 0, nan", "0.5: 0.1, 0, nan"])
def test_a_camera_path_of_nan_is_refused(text):
    from custvid_core.control.camera import CameraPath

    with pytest.raises(InputError, match="^camera_path: "):
        CameraPath.parse(text)


def test_a_subject_set_with_an_empty_mask_is_refused():
    """With an empty mask the region loss is zero and nothing is learned from that photo."""
    from custvid_core.training import SubjectSet

    masks = torch.zeros(2, 1, 1, 8, 8)
    masks[0, ..., 2:4, 2:4] = 1
    with pytest.raises(InputError, match="^masks: mask 1 is empty"):
        SubjectSet(torch.randn(2, 16, 1, 8, 8), torch.randn(1, 5, 64), masks)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickled_file_with_code_is_refused_without_advice_to_run_it(tmp_path, capsys):
    path = tmp_path / "lora.pt"
    torch.save({"w": torch.zeros(2), "code": _Payload()}, path)
    with pytest.raises(InputError) as refused:
        load_state_dict(path, "lora_name")
    message = str(refused.value)
    assert message.startswith("lora_name: 'lora.pt' could not be read as a weights-only file: it holds Python objects "
                              "other than tensors")
    assert "weights_only" not in message and refused.value.__cause__ is None
    assert "this ran" not in capsys.readouterr().out
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="^lora_name: 'broken.pt' could not be read as a weights-only torch file"):
        load_state_dict(tmp_path / "broken.pt", "lora_name")


@pytest.mark.parametrize("change, problem", [
    (dict(hidden_size=10 ** 9), "hidden_size = 1000000000"),
    (dict(num_hidden_layers=0), "num_hidden_layers = 0"),
    (dict(num_attention_heads=5), "5 attention heads for a width of 64"),
    (dict(patch_size=-14), "patch_size = -14"),
    (dict(image_size="big"), "image_size = 'big'"),
    (dict(patch_size=64, image_size=32), "patches of 64 pixels in 32-pixel images"),
])
def test_a_dinov2_config_of_absurd_sizes_is_refused_before_a_model_is_built(tmp_path, change, problem):
    build_dinov2(TINY_DINO).model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputError, match=f"^dino_name: 'model.safetensors' has {problem}"):
        load_dinov2(tmp_path, "dino_name")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="dino_name: '.*config.json' is not a JSON object"):
        load_dinov2(tmp_path, "dino_name")


def test_errors_show_the_packs_name_and_survive_a_copy():
    """ComfyUI titles its error dialog with the error type's module and name."""
    from custvid_core.training import TrainingStopped

    error = InputError("steps", "0", "at least 1 step")
    assert f"{type(error).__module__}.{type(error).__qualname__}" == "CustVid.InputError"
    assert f"{TrainingStopped.__module__}.{TrainingStopped.__qualname__}" == "CustVid.TrainingStopped"
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, InputError) and str(copy) == str(error) and copy.input_name == "steps"
