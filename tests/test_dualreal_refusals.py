"""Bad DualReal input beyond test_dualreal's: weights for a model of another width, image embeddings of two widths,
and damaged files; each refused with the input named."""

import json

import pytest
import torch
from builders import tiny_diffusers_wan
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from custvid_core.adapters.dualreal import load_dualreal, save_dualreal
from custvid_core.adapters.parts import attached
from custvid_core.adapters.stage_blender import dualreal_parts
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import OptimSettings, SubjectSet, VideoSet
from custvid_core.training.dualreal import DualRealSettings, ImageEmbeddings, dualreal_weights, train_dualreal

BLOCKS = 3


def _data():
    g = torch.Generator().manual_seed(0)
    return (SubjectSet(torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g)),
            VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g)))


def _settings():
    return DualRealSettings(bottleneck=8, optim=OptimSettings(steps=1, lr=1e-3, warmup=0))


def test_weights_for_a_model_of_another_width_are_refused():
    weights = dualreal_weights(train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), *_data(), _settings()))
    from diffusers import WanTransformer3DModel

    narrower = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                     out_channels=16, text_dim=64, freq_dim=32, ffn_dim=64, num_layers=BLOCKS)
    with pytest.raises(InputError, match="dualreal_file: made for a model with dim 32, and this one has dim 16"):
        with attached(describe(narrower), dualreal_parts(weights, input_name="dualreal_file")):
            pass


def test_image_embeddings_of_two_widths_are_refused_before_training(tmp_path):
    embeddings = ImageEmbeddings(torch.zeros(2, 12), torch.zeros(1, 7))
    with pytest.raises(InputError, match=r"image_embeddings: widths 12 \(clips\) and 7 \(subject\)"):
        train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), *_data(), _settings(), embeddings, workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _damaged(description):
    if callable(description):
        return lambda meta: {**meta, "custvid.dualreal": json.dumps(description(json.loads(meta["custvid.dualreal"])))}
    return lambda meta: {**meta, "custvid.dualreal": description}


@pytest.mark.parametrize("damage", [
    _damaged("{not json"),
    _damaged(lambda d: [d]),
    _damaged(lambda d: {**d, "identity": {k: v for k, v in d["identity"].items() if k != "kind"}}),
    _damaged(lambda d: {**d, "motion": {k: v for k, v in d["motion"].items() if k != "spec"}}),
    _damaged(lambda d: {**d, "motion": {**d["motion"], "spec": {**d["motion"]["spec"], "rank": 4}}}),
    _damaged(lambda d: {**d, "controller": {k: v for k, v in d["controller"].items() if k != "groups"}}),
], ids=["not_json", "not_a_mapping", "no_kind", "no_spec", "unknown_setting", "controller_without_groups"])
def test_a_damaged_dualreal_file_is_refused_naming_the_input(tmp_path, damage):
    weights = dualreal_weights(train_dualreal(describe(tiny_diffusers_wan(BLOCKS)), *_data(), _settings()))
    path = save_dualreal(tmp_path / "dr.safetensors", weights)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(path), str(path), metadata=damage(metadata))
    with pytest.raises(InputError, match="dualreal_name: its description of the parts is damaged"):
        dualreal_parts(load_dualreal(path, "dualreal_name"), input_name="dualreal_name")
