import json

import pytest
import torch
from builders import TINY_DINO
from safetensors.torch import save_file

from custvid_core.errors import InputError
from custvid_core.representations.storage import load_representation, save_representation
from custvid_core.representations.subject import extract_subject, load_dinov2

quiet = dict(progress=lambda done, total: None)


def test_features_on_a_known_grid_for_images_of_any_size(tiny_dino):
    images = [torch.rand(40, 60, 3), torch.rand(70, 30, 4), torch.rand(56, 56, 3)]
    rep = extract_subject(tiny_dino, images, resolution=56, **quiet)
    assert rep.patch_tokens.shape == (3, 4, 4, 64)
    assert rep.cls_token.shape == (3, 64) and rep.object_features.shape == (3, 64)
    assert rep.grid == (4, 4) and not rep.has_masks
    # Without masks the object feature is the plain mean of the patch tokens.
    assert torch.allclose(rep.object_features, rep.patch_tokens.mean((1, 2)), atol=1e-5)


def test_patch_tokens_and_cls_are_dinov2_outputs(tiny_dino):
    image = torch.rand(1, 56, 56, 3)
    rep = extract_subject(tiny_dino, image, resolution=56, **quiet)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = tiny_dino.model(pixel_values=(image.permute(0, 3, 1, 2) - mean) / std).last_hidden_state
    assert torch.allclose(rep.cls_token, hidden[:, 0], atol=1e-5)
    assert torch.allclose(rep.patch_tokens.reshape(1, 16, 64), hidden[:, 1:], atol=1e-5)


def test_mask_pooling_weights_patches_by_subject_coverage(tiny_dino):
    image = torch.rand(1, 56, 56, 3)
    mask = torch.zeros(1, 56, 56)
    mask[0, :14, :28] = 1.0  # exactly the first two patches of the top row
    rep = extract_subject(tiny_dino, image, mask, resolution=56, **quiet)
    expected = rep.patch_tokens[0, 0, :2].mean(0)
    assert torch.allclose(rep.object_features[0], expected, atol=1e-5)
    assert rep.patch_masks[0].sum() == pytest.approx(2.0, abs=1e-4)


def test_pad_keeps_aspect_and_stretch_does_not(tiny_dino):
    wide = torch.rand(1, 28, 56, 3)
    mask = torch.ones(1, 28, 56)
    padded = extract_subject(tiny_dino, wide, mask, resolution=56, fit="pad", **quiet)
    stretched = extract_subject(tiny_dino, wide, mask, resolution=56, fit="stretch", **quiet)
    assert padded.patch_masks[0, 0].sum() == pytest.approx(0.0, abs=1e-4)  # padding rows carry no subject
    assert stretched.patch_masks.min() == pytest.approx(1.0, abs=1e-4)


def test_saved_form_loads_back_identically(tiny_dino, tmp_path):
    rep = extract_subject(tiny_dino, torch.rand(2, 30, 40, 3), torch.rand(2, 30, 40), resolution=56, **quiet)
    path = save_representation(rep, tmp_path / "subject.safetensors")
    back = load_representation(path, "subject")
    for name in ("patch_tokens", "cls_token", "object_features", "patch_masks"):
        assert torch.equal(getattr(back, name), getattr(rep, name))
    assert (back.encoder, back.resolution, back.patch_size, back.fit, back.has_masks) == \
           (rep.encoder, rep.resolution, rep.patch_size, rep.fit, rep.has_masks)
    with pytest.raises(InputError, match="holds a subject representation"):
        load_representation(path, "motion")


def _old_transformers_names(sd):
    renames = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
               "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}
    out = {}
    for k, v in sd.items():
        for new, old in renames.items():
            k = k.replace(new, old)
        out["dinov2." + k] = v.contiguous()
    return out


def test_loads_from_a_transformers_folder_and_from_single_files(tiny_dino, tmp_path):
    image = torch.rand(1, 56, 56, 3)
    reference = extract_subject(tiny_dino, image, resolution=56, **quiet).patch_tokens
    folder = tmp_path / "dinov2-tiny"
    tiny_dino.model.save_pretrained(folder)
    single = tmp_path / "dinov2_old_names.safetensors"
    # Published checkpoints use the pre-v5 attention names and sometimes a prefix.
    save_file(_old_transformers_names(tiny_dino.model.state_dict()), str(single))
    with_meta = tmp_path / "with_config.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dino.model.state_dict().items()}, str(with_meta),
              metadata={"config": json.dumps(TINY_DINO)})
    for source in (folder, folder / "model.safetensors", single, with_meta):
        encoder = load_dinov2(source)
        assert encoder.patch_size == 14 and encoder.feature_dim == 64
        got = extract_subject(encoder, image, resolution=56, **quiet).patch_tokens
        assert torch.allclose(got, reference, atol=1e-5), source


def test_weights_of_another_architecture_are_refused(tiny_raft, tmp_path):
    path = tmp_path / "raft.pth"
    torch.save(tiny_raft.model.state_dict(), path)
    with pytest.raises(InputError, match="dino_path: .*raft.pth.* DINOv2"):
        load_dinov2(path)
    with pytest.raises(InputError, match="dino_path: .* does not exist"):
        load_dinov2(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no weights"):
        load_dinov2(empty)


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.zeros(0, 32, 32, 3)), "images: no images were given"),
    (dict(images=[]), "images: no images were given"),
    (dict(images=torch.rand(2, 32, 32, 3), masks=torch.ones(3, 32, 32)), "masks: 3 masks were given for 2 images"),
    (dict(images=torch.rand(2, 32, 32, 3), masks=torch.ones(2, 16, 32)), "masks: mask 0 is"),
    (dict(images=torch.rand(1, 32, 32, 3), masks=torch.zeros(1, 32, 32)), "masks: mask 0 is empty"),
    (dict(images=torch.rand(1, 32, 32, 3), resolution=100000), "resolution: 100000"),
    (dict(images=torch.rand(1, 32, 32, 3), resolution=50), "multiple of 14"),
    (dict(images=torch.rand(1, 32, 32, 1)), "images: image 0 has shape"),
    (dict(images=torch.rand(1, 1, 9000, 3)), "images: image 0 is 9000x1 pixels"),
    (dict(images=torch.rand(1, 32, 32, 3), fit="crop"), "fit: 'crop'"),
])
def test_bad_input_names_the_input(tiny_dino, kwargs, match):
    kwargs.setdefault("resolution", 56)
    with pytest.raises(InputError, match=match):
        extract_subject(tiny_dino, **kwargs, **quiet)
