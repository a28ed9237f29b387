"""`python -m custvid_core train CONFIG.toml`: a TOML config read into the recipes' own settings (refusals name the
key), tiny Wan models (diffusers layout: transformer, AutoencoderKLWan, UMT5 with a word-level tokenizer; and a
ComfyUI-layout single file) built here with random weights, LoRAs trained from folders of photos and clips, resumed."""

import json
import sys
from pathlib import Path

import pytest
import torch
from builders import moving_square_clip, tiny_diffusers_wan

from custvid_core.adapters.lora import MOTION_ROLES, SUBJECT_ROLES, read_lora
from custvid_core.backbones import describe, diffusers_to_native_key
from custvid_core.cli import main
from custvid_core.media import save_mp4, save_png
from custvid_core.training.config import load_config, load_wan_transformer, train_from_config

WORDS = ["<pad>", "</s>", "<unk>", "a", "sks", "dog", "cat", "runs", "on", "the", "grass", "mtn"]


def tiny_pipeline(folder: Path, text_dim: int = 64) -> Path:
    """A diffusers-layout Wan pipeline folder: transformer/, vae/, text_encoder/ (UMT5 `text_dim` wide), tokenizer/
    (word level)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    model = tiny_diffusers_wan()
    if text_dim != model.config.text_dim:
        model = WanTransformer3DModel(**{**{k: v for k, v in model.config.items() if not k.startswith("_")},
                                         "text_dim": text_dim})
    with torch.no_grad():  # diffusers starts the modulation tables at zero; make every block matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder / "transformer")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(folder / "vae")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=text_dim, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(folder / "text_encoder")
    return folder


def comfy_single_file(path: Path, text_dim: int = 64) -> tuple[Path, torch.nn.Module]:
    """A tiny Wan 2.1 in ComfyUI's native keys (128-wide heads, as ComfyUI's model detection assumes; ComfyUI
    also assumes Wan's 4096-wide text), saved as one .safetensors file the way ComfyUI's models/diffusion_models holds
    them; and the model it was made from."""
    from diffusers import WanTransformer3DModel

    from custvid_core.files import save_safetensors

    torch.manual_seed(1)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=64, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_safetensors(path, {"model.diffusion_model." + diffusers_to_native_key(k): v
                            for k, v in model.state_dict().items()})
    return path, model


def write_data(root: Path) -> None:
    """photos/ (3 photos with masks in masks/ and sidecar captions), clips/ (2 mp4 files and a folder of frames),
    prior/ (2 mp4 files captioned "<subject> | <action>", as SynMotion's subject prior clips)."""
    (root / "photos" / "masks").mkdir(parents=True)
    for i in range(3):
        clip, masks = moving_square_clip(frames=5, size=(64, 64), step=(3 + i, 2))
        save_png(clip[i], root / "photos" / f"dog{i}.png")
        save_png(masks[i][..., None].expand(-1, -1, 3), root / "photos" / "masks" / f"dog{i}.png")
        (root / "photos" / f"dog{i}.txt").write_text("a sks dog on the grass\n")
    (root / "clips" / "run2").mkdir(parents=True)
    for i in range(2):
        clip, _ = moving_square_clip(frames=5, size=(64, 64), step=(4, 1 + i))
        save_mp4(clip, root / "clips" / f"run{i}.mp4")
        (root / "clips" / f"run{i}.txt").write_text("a dog mtn runs")
    clip, _ = moving_square_clip(frames=5, size=(64, 64), step=(2, 3))
    for f in range(5):
        save_png(clip[f], root / "clips" / "run2" / f"{f:03d}.png")
    (root / "clips" / "run2.txt").write_text("a cat mtn runs")
    (root / "prior").mkdir()
    for i, caption in enumerate(["a cat | runs on the grass", "a dog | runs"]):
        clip, _ = moving_square_clip(frames=5, size=(64, 64), step=(1, 2 + i))
        save_mp4(clip, root / "prior" / f"walk{i}.mp4")
        (root / "prior" / f"walk{i}.txt").write_text(caption)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_config")
    tiny_pipeline(root / "wan")
    comfy_single_file(root / "wan_t2v_tiny.safetensors")
    write_data(root)
    return root


SUBJECT = """
[model]
path = "wan"

[[datasets]]
path = "photos"
trigger_words = "sks dog"

[[datasets]]
path = "clips"
kind = "clips"

[recipe]
type = "subject"
rank = 4
alignment_block = 1

[recipe.optim]
steps = 4
lr = 1e-3

[output]
folder = "out_subject"
name = "my_dog"
checkpoint_every = 2
"""

MOTION = """
[model]
path = "wan/transformer"
vae = "wan/vae"
text_encoder = "wan/text_encoder"
tokenizer = "wan/tokenizer"

[[datasets]]
path = "clips"
kind = "clips"
stills = 2

[recipe]
type = "motion"
rank = 4
spatial_rank = 2

[recipe.optim]
steps = 4
lr = 1e-3

[output]
folder = "out_motion"
"""


SYNMOTION = """
[model]
path = "wan"

[[datasets]]
path = "clips"
kind = "clips"
trigger_words = "a dog, a cat"
motion_words = "mtn runs"
hue_copies = 1

[[datasets]]
path = "prior"
kind = "clips"
use = "prior"

[recipe]
type = "synmotion"
rank = 4
motion_probability = 0.5

[recipe.optim]
steps = 4
lr = 1e-3

[output]
folder = "out_synmotion"
name = "mtn"
checkpoint_every = 2
"""
SYNMOTION_ALONE = SYNMOTION.replace('[[datasets]]\npath = "prior"\nkind = "clips"\nuse = "prior"\n', "")


def config_file(root: Path, text: str, name: str = "config.toml") -> Path:
    path = root / name
    path.write_text(text)
    return path


def test_a_subject_lora_from_a_folder_of_photos_with_masks_and_captions(workspace):
    config = load_config(config_file(workspace, SUBJECT))
    assert config.settings.rank == 4 and config.settings.roles == SUBJECT_ROLES  # the settings' own defaults kept
    assert config.optim.steps == 4 and config.optim.checkpoint_every == 2 and config.optim.warmup == 0
    assert [d.use for d in config.datasets] == ["subject", "preservation"]  # clips beside photos preserve
    records = []
    files = train_from_config(config, progress=lambda step, total, record: records.append((step, total, record)))
    assert [(s, t) for s, t, _ in records] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert {"region", "token_attention"} <= set(records[0][2])  # the masks and the trigger words reached the losses
    assert {"preservation"} <= {k for _, _, r in records for k in r}
    tensors, spec, meta = read_lora(files["lora"])
    assert files["lora"] == workspace / "out_subject" / "my_dog.safetensors"
    assert spec.roles == SUBJECT_ROLES and spec.rank == 4
    assert meta["custvid.lora.info"]["trigger_words"] == "sks dog"
    assert meta["custvid.lora.base_model"] == {"architecture": "wan", "blocks": 2, "dim": 32, "text_dim": 64}
    assert set(tensors) == {f"diffusion_model.blocks.{b}.{r}.lora_{d}.weight" for b in range(2) for r in SUBJECT_ROLES
                            for d in ("down", "up")} | {f"diffusion_model.blocks.{b}.{r}.alpha" for b in range(2)
                                                        for r in SUBJECT_ROLES}
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_up" in k)  # it learned
    assert len(json.loads(files["history"].read_text())) == 4 and files["loss_plot"].exists()
    assert (workspace / "out_subject" / "checkpoints" / "my_dog" / "checkpoint.pt").exists()


def test_a_motion_lora_from_video_files_and_a_frame_folder_with_separate_model_parts(workspace):
    config = load_config(config_file(workspace, MOTION, "motion.toml"))
    assert config.output.name == "motion" and config.datasets[0].use == "motion"
    records = []
    files = train_from_config(config, progress=lambda step, total, record: records.append(record))
    assert {"spatial", "mse", "debiased"} <= {k for r in records for k in r}  # both phases ran on 5-frame clips
    tensors, spec, _ = read_lora(files["lora"])
    assert spec.roles == MOTION_ROLES and spec.rank == 4
    assert {k.split(".")[3] for k in tensors} >= {"self_attn", "cross_attn", "ffn"}


def test_a_comfyui_single_file_loads_as_the_model_it_was_written_from(workspace, tmp_path):
    from diffusers import WanTransformer3DModel

    loaded = load_wan_transformer(workspace / "wan_t2v_tiny.safetensors", torch.float32)
    _, original = comfy_single_file(tmp_path / "again.safetensors")
    assert isinstance(loaded, WanTransformer3DModel) and loaded.config.num_layers == 2 and loaded.config.text_dim == 64
    x, context = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, 64)
    with torch.no_grad():
        assert torch.allclose(describe(loaded).forward(x, 0.4, context), describe(original).forward(x, 0.4, context),
                              atol=1e-5)
    # And it trains from a config, the VAE and text encoder given apart.
    text = MOTION.replace('path = "wan/transformer"', 'path = "wan_t2v_tiny.safetensors"').replace(
        "steps = 4", "steps = 2").replace('folder = "out_motion"', 'folder = "out_single"')
    files = train_from_config(load_config(config_file(workspace, text, "single.toml")))
    assert read_lora(files["lora"])[1].rank == 4


def test_a_rerun_resumes_and_ends_with_the_lora_of_one_uninterrupted_run(workspace):
    class Stop(Exception):
        pass

    def stop_after_3(step, total, record):
        if step == 3:
            raise Stop

    text = SUBJECT.replace("steps = 4", "steps = 6").replace('folder = "out_subject"', 'folder = "out_resumed"')
    interrupted = load_config(config_file(workspace, text, "resumed.toml"))
    with pytest.raises(Stop):
        train_from_config(interrupted, progress=stop_after_3)
    assert not (workspace / "out_resumed" / "my_dog.safetensors").exists()  # nothing half-done is written
    notes, steps = [], []
    resumed = train_from_config(interrupted, progress=lambda s, t, r: steps.append(s), log=notes.append)
    assert notes == ["resumed from step 2 of 6"] and steps == [3, 4, 5, 6]  # the checkpoint of step 2 (every 2)
    whole = train_from_config(load_config(config_file(
        workspace, text.replace('folder = "out_resumed"', 'folder = "out_whole"'), "whole.toml")))
    a, b = read_lora(resumed["lora"])[0], read_lora(whole["lora"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    notes.clear()
    train_from_config(interrupted, log=notes.append)  # a third run: already done, the same file
    assert notes == ["already trained (6 steps)"]
    assert all(torch.equal(read_lora(resumed["lora"])[0][k], a[k]) for k in a)


@pytest.mark.parametrize("edit, match", [
    (("rank = 4", "rnak = 4"), r"\[recipe\]: unknown key 'rnak'. Expected valid: rank, roles, optim, batch"),
    (("lr = 1e-3", "learning_rate = 1e-3"), r"\[recipe.optim\]: unknown key 'learning_rate'. Expected valid: steps, lr,"),
    (("[recipe.optim]", "[recipe.optim]\ncheckpoint_every = 3"), r"\[recipe.optim\]: unknown key 'checkpoint_every'. "
                                                                 r"Expected checkpoint_every in \[output\]"),
    (("[recipe.optim]", "[recipe.optim]\npreview_every = 3"), r"\[recipe.optim\]: unknown key 'preview_every'. "
                                                              r"Expected no previews in the train command"),
    (("rank = 4", 'rank = "4"'), r"\[recipe\] rank: '4' is a string. Expected an integer"),
    (("rank = 4", "roles = 'ffn.0'"), r"\[recipe\] roles: 'ffn.0' is a string. Expected a list of a string each"),
    (("rank = 4", "region_loss = 1"), r"\[recipe\] region_loss: 1 is an integer. Expected true or false"),
    (("lr = 1e-3", "lr = 2.0"), r"learning_rate: 2.0. Expected a learning rate between 0 and 1"),
    (('path = "wan"', 'path = "no_such_model"'), r"\[model\] path: '.*no_such_model' does not exist"),
    (('path = "photos"', 'path = "no_photos"'), r"\[\[datasets\]\] #1 path: '.*no_photos' does not exist"),
    (('path = "photos"', 'path = "photos"\nmask = "m"'), r"\[\[datasets\]\] #1: unknown key 'mask'. Expected valid: path,"),
    (('type = "subject"', 'type = "subjet"'), r"\[recipe\] type: 'subjet'. Expected one of subject, motion, joint, dualreal"),
    (('type = "subject"', 'type = "motion"'), r"\[\[datasets\]\]: datasets used as subject. Expected what the motion "),
    (('kind = "clips"', 'kind = "clips"\nuse = "subject"'), r"use: 'subject' for clips"),
    (("[output]", "[outputs]"), r"CONFIG: unknown section 'outputs'"),
    (('type = "subject"', 'type = "joint"\n[recipe.subject]\noptim = {steps = 3}'),
     r"\[recipe.subject\]: unknown key 'optim'. Expected the joint run's one optimiser in \[recipe.optim\]"),
    (('name = "my_dog"', 'name = "../my_dog"'), r"\[output\] name: '../my_dog'. Expected a file name without folders"),
    (("checkpoint_every = 2", "checkpoint_every = 0"), r"\[output\] checkpoint_every: 0. Expected at least 1 step"),
])
def test_a_bad_config_is_refused_naming_the_key(workspace, edit, match):
    old, new = edit
    assert old in SUBJECT
    with pytest.raises(ValueError, match=match):
        load_config(config_file(workspace, SUBJECT.replace(old, new, 1), "bad.toml"))


def test_bad_datasets_are_refused_naming_the_dataset_and_what_to_do(workspace, tmp_path):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(workspace / "photos", photos)
    text = SUBJECT.replace('path = "wan"', f'path = "{workspace / "wan"}"').replace('path = "photos"', 'path = "photos"')
    text = text.replace('path = "clips"', f'path = "{workspace / "clips"}"')
    config = config_file(tmp_path, text)
    (photos / "masks" / "dog1.png").unlink()
    with pytest.raises(ValueError, match=r"masks: 'dog1.png' in .* has no mask and other photos have"):
        train_from_config(load_config(config))
    shutil.rmtree(photos / "masks")
    (photos / "dog2.txt").unlink()
    with pytest.raises(ValueError, match=r"caption: 'dog2.png' has no caption \(dog2.txt is missing"):
        train_from_config(load_config(config))
    with pytest.raises(ValueError, match=r"trigger_words: 'cat' is not in the prompt 'a sks dog on the grass'"):
        train_from_config(load_config(config_file(tmp_path, text.replace(
            'trigger_words = "sks dog"', 'trigger_words = "cat"\ncaption = "a sks dog on the grass"'))))


def test_model_parts_that_cannot_load_host_free_are_refused_with_what_to_do(workspace, tmp_path):
    text = MOTION.replace('vae = "wan/vae"\n', "")
    with pytest.raises(ValueError, match=r"\[model\] vae: not given, .*encode the dataset in ComfyUI"):
        train_from_config(load_config(config_file(workspace, text, "novae.toml")))
    (tmp_path / "vae.safetensors").write_bytes(b"")
    text = MOTION.replace('vae = "wan/vae"', f'vae = "{tmp_path / "vae.safetensors"}"')
    with pytest.raises(ValueError, match=r"\[model\] vae: .* could not be loaded as a diffusers AutoencoderKLWan"):
        train_from_config(load_config(config_file(workspace, text, "filevae.toml")))
    narrower, _ = comfy_single_file(tmp_path / "narrow_text.safetensors", text_dim=32)
    text = MOTION.replace('path = "wan/transformer"', f'path = "{narrower}"')
    with pytest.raises(ValueError, match=r"\[model\] text_encoder: it encodes 64-wide text and the model takes 32"):
        train_from_config(load_config(config_file(workspace, text, "narrow.toml")))
    (tmp_path / "not_wan.safetensors").write_bytes((workspace / "wan" / "vae" / "diffusion_pytorch_model.safetensors")
                                                   .read_bytes())
    with pytest.raises(ValueError, match=r"\[model\] path: 'not_wan.safetensors' is not a Wan diffusion model"):
        load_wan_transformer(tmp_path / "not_wan.safetensors", torch.float32)


def test_the_command_line(workspace, capsys, monkeypatch):
    path = config_file(workspace, SUBJECT.replace('folder = "out_subject"', 'folder = "out_cli"'), "cli.toml")
    assert main(["train", str(path), "--dry-run", "--steps", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["steps"] == 2 and shown["recipe"] == "subject"
    assert [(d["items"], d["masks"]) for d in shown["datasets"]] == [(3, 3), (3, 0)]
    assert shown["writes"]["lora"] == str(workspace / "out_cli" / "my_dog.safetensors")
    assert not (workspace / "out_cli").exists()  # a dry run trains and writes nothing
    monkeypatch.setattr(sys, "argv", ["custvid_core", "train", str(path), "--steps", "2"])
    assert main(["train", str(path), "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["lora"] == str(workspace / "out_cli" / "my_dog.safetensors")
    assert "2/2" in err and "loss=" in err and "s_per_step=" in err  # tqdm's bar
    with pytest.raises(SystemExit) as stop:
        main(["train", str(config_file(workspace, SUBJECT.replace("rank = 4", "rnak = 4"), "cli_bad.toml"))])
    assert stop.value.code == 2 and "unknown key 'rnak'" in capsys.readouterr().err


JOINT = """
[model]
path = "wan"

[[datasets]]
path = "photos"

[[datasets]]
path = "clips"
kind = "clips"
stills = 1

[recipe]
type = "{recipe}"
{settings}

[recipe.optim]
steps = 2

[output]
folder = "out_{recipe}"
"""


def test_joint_and_dualreal_runs_write_the_files_their_save_nodes_write(workspace):
    from custvid_core.adapters.dualreal import load_dualreal

    joint = load_config(config_file(workspace, JOINT.format(
        recipe="joint", settings="motion_probability = 0.5\n[recipe.subject]\nrank = 2\n[recipe.motion]\nrank = 3\n"
                                 "spatial_rank = 0\n[recipe.controller]\ngroups = 1"), "joint.toml"))
    assert joint.settings.controller.groups == 1 and joint.settings.motion.rank == 3
    files = train_from_config(joint)
    assert read_lora(files["subject_lora"])[1].rank == 2 and read_lora(files["motion_lora"])[1].rank == 3
    assert set(load_dualreal(files["dualreal"]).parts) == {"identity", "motion", "controller"}
    dualreal = load_config(config_file(workspace, JOINT.format(recipe="dualreal", settings="bottleneck = 4\ngroups = 1"),
                                       "dualreal.toml"))
    files = train_from_config(dualreal)
    assert files["dualreal"].name == "dualreal.safetensors"
    assert set(load_dualreal(files["dualreal"]).parts) == {"identity", "motion", "controller"}


def test_photos_of_mixed_sizes_need_buckets_and_train_with_them(workspace, tmp_path):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(workspace / "photos", photos)
    clip, masks = moving_square_clip(frames=2, size=(48, 80), step=(3, 2))
    save_png(clip[0], photos / "wide.png")
    save_png(masks[0][..., None].expand(-1, -1, 3), photos / "masks" / "wide.png")
    (photos / "wide.txt").write_text("a sks dog on the grass")
    text = SUBJECT.replace('path = "wan"', f'path = "{workspace / "wan"}"').replace(
        '[[datasets]]\npath = "clips"\nkind = "clips"\n', "").replace("steps = 4", "steps = 2")
    with pytest.raises(ValueError, match=r"\[\[datasets\]\] photos: photos of different sizes .* or buckets = true"):
        train_from_config(load_config(config_file(tmp_path, text)))
    text = text.replace('trigger_words = "sks dog"', 'trigger_words = "sks dog"\nbuckets = true\n'
                                                     'bucket_width = 64\nbucket_height = 64')
    records = []
    files = train_from_config(load_config(config_file(tmp_path, text)), progress=lambda s, t, r: records.append(r))
    assert len(records) == 2 and read_lora(files["lora"])[1].rank == 4


def test_a_dataset_cache_trains_as_the_folder_it_was_encoded_from(workspace, tmp_path):
    """A cache holds the VAE's latents as ComfyUI's VAE Encode gives them (Save Dataset Cache's files): read back and
    put in the model's latent format, it trains the LoRA the folder trains."""
    from custvid_core.training import config as train_config
    from custvid_core.training.dataset_cache import MadeBy, save_dataset

    text = SUBJECT.replace('path = "wan"', f'path = "{workspace / "wan"}"').replace(
        '[[datasets]]\npath = "clips"\nkind = "clips"\n', "").replace('path = "photos"', f'path = "{workspace / "photos"}"')
    from_folder = load_config(config_file(tmp_path, text.replace("out_subject", "from_folder"), "folder.toml"))
    encoders = train_config._encoders(from_folder.model, torch.device("cpu"), torch.float32)
    raw = train_config._photo_set(from_folder.datasets[0], encoders, None)
    save_dataset(tmp_path / "dog.safetensors", raw, MadeBy("vae", "text encoder"))
    cached = text.replace(f'path = "{workspace / "photos"}"\ntrigger_words = "sks dog"', 'cache = "dog.safetensors"')
    from_cache = load_config(config_file(tmp_path, cached.replace("out_subject", "from_cache"), "cache.toml"))
    assert from_cache.datasets[0].kind == "photos" and from_cache.datasets[0].use == "subject"
    a = read_lora(train_from_config(from_folder)["lora"])[0]
    b = read_lora(train_from_config(from_cache)["lora"])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"cache: 'photos' is not a CustVid dataset cache|cache: '.*' does not exist"):
        load_config(config_file(tmp_path, cached.replace('cache = "dog.safetensors"', 'cache = "none.safetensors"'),
                                "nocache.toml"))


def test_raft_and_dinov2_give_the_recipes_their_alignment_losses(workspace, tmp_path, tiny_raft, tiny_dino):
    torch.save(tiny_raft.model.state_dict(), tmp_path / "raft_small.pth")
    tiny_dino.model.save_pretrained(tmp_path / "dinov2")
    base = f'path = "{workspace / "wan"}"\nraft = "raft_small.pth"\ndino = "dinov2"\ndino_resolution = 56'
    motion = MOTION.replace('path = "wan/transformer"\nvae = "wan/vae"\ntext_encoder = "wan/text_encoder"\n'
                            'tokenizer = "wan/tokenizer"', base) \
        .replace("spatial_rank = 2", "spatial_rank = 0\nalignment_block = 1") \
        .replace('path = "clips"', f'path = "{workspace / "clips"}"').replace("steps = 4", "steps = 1")
    records = []
    train_from_config(load_config(config_file(tmp_path, motion, "motion.toml")), progress=lambda s, t, r: records.append(r))
    assert "alignment" in records[0]  # MoRA, on the clips' RAFT flow
    subject = SUBJECT.replace('path = "wan"', base).replace('[[datasets]]\npath = "clips"\nkind = "clips"\n', "") \
        .replace('path = "photos"', f'path = "{workspace / "photos"}"').replace("steps = 4", "steps = 1")
    records.clear()
    train_from_config(load_config(config_file(tmp_path, subject, "subject.toml")), progress=lambda s, t, r: records.append(r))
    assert "alignment" in records[0]  # SuRA, on the photos' DINOv2 features


def synmotion_files(files: dict) -> dict[str, torch.Tensor]:
    from custvid_core.adapters.synmotion import load_synmotion

    lora = read_lora(files["lora"])[0]
    embeddings = load_synmotion(files["synmotion"]).exported().tensors
    return {**{f"lora.{k}": v for k, v in lora.items()}, **{f"embeddings.{k}": v for k, v in embeddings.items()}}


def test_a_synmotion_run_from_folders_of_clips_writes_the_files_its_save_nodes_write(workspace):
    from custvid_core.adapters.lora import SYNMOTION_MOTION_ROLES
    from custvid_core.adapters.synmotion import load_synmotion

    config = load_config(config_file(workspace, SYNMOTION, "synmotion.toml"))
    assert config.settings.rank == 4 and config.settings.motion_probability == 0.5 and config.settings.prior
    assert config.settings.refiner and [d.use for d in config.datasets] == ["motion", "prior"]
    files = train_from_config(config)
    assert sorted(files) == ["history", "lora", "loss_plot", "synmotion"]
    tensors, spec, meta = read_lora(files["lora"])
    assert spec.rank == 4 and spec.roles == SYNMOTION_MOTION_ROLES and meta["custvid.lora.info"]["trigger_words"] == "mtn runs"
    learned = load_synmotion(files["synmotion"])
    assert (learned.subject_words, learned.motion_words) == ("a dog, a cat", "mtn runs")
    history = json.loads(files["history"].read_text())
    assert len(history) == 4 and {t for r in history for t in r} >= {"motion", "prior"}  # both kinds of steps ran
    # Without prior clips, every step is a motion step (as Train SynMotion without prior_clips).
    alone = load_config(config_file(workspace, SYNMOTION_ALONE, "synmotion_alone.toml"))
    assert not alone.settings.prior and [d.use for d in alone.datasets] == ["motion"]


def test_a_synmotion_rerun_resumes_and_ends_with_the_files_of_one_uninterrupted_run(workspace):
    class Stop(Exception):
        pass

    def stop_after_3(step, total, record):
        if step == 3:
            raise Stop

    text = SYNMOTION.replace('folder = "out_synmotion"', 'folder = "out_synmotion_resumed"')
    interrupted = load_config(config_file(workspace, text, "synmotion_resumed.toml"))
    with pytest.raises(Stop):
        train_from_config(interrupted, progress=stop_after_3)
    assert not (workspace / "out_synmotion_resumed" / "mtn_embeddings.safetensors").exists()
    notes = []
    resumed = train_from_config(interrupted, log=notes.append)
    assert notes == ["resumed from step 2 of 4"]
    whole = train_from_config(load_config(config_file(
        workspace, text.replace("out_synmotion_resumed", "out_synmotion_whole"), "synmotion_whole.toml")))
    a, b = synmotion_files(resumed), synmotion_files(whole)
    assert a.keys() == b.keys() and any(k.startswith("embeddings.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_synmotion_gives_one_clip_and_its_hue_copy_a_conditioning_row_each(workspace):
    import shutil

    folder = workspace / "one_clip"
    folder.mkdir(exist_ok=True)
    for name in ("run0.mp4", "run0.txt"):
        shutil.copy(workspace / "clips" / name, folder / name)
    from custvid_core.training.config import build_datasets

    text = SYNMOTION_ALONE.replace('path = "clips"', 'path = "one_clip"')
    data = build_datasets(load_config(config_file(workspace, text, "one_clip.toml")), torch.device("cpu"), torch.float32)
    clips = data["motion"]  # SynMotion's step conditions a clip on its own row: the copy needs one too
    assert clips.latents.shape[0] == 2 and clips.context.shape[0] == 2 and torch.equal(clips.context[0], clips.context[1])
    assert len(data["synmotion"].positions) == 2 and data["synmotion"].positions[0] == data["synmotion"].positions[1]


@pytest.mark.parametrize("text, edit, match", [
    (SYNMOTION, ('motion_words = "mtn runs"\n', ""),
     r"\[\[datasets\]\] clips motion_words: is missing. Expected the motion's words in every caption"),
    (SYNMOTION, ('trigger_words = "a dog, a cat"\n', ""), r"\[\[datasets\]\] clips trigger_words: is missing"),
    (SYNMOTION, ("rank = 4", "rnak = 4"), r"\[recipe\]: unknown key 'rnak'. Expected valid: rank, motion_probability,"),
    (SYNMOTION, ("rank = 4", "rank = 4\nprior = false"), r"\[recipe\] prior: false with prior clips. Expected prior = "),
    (SYNMOTION_ALONE, ("rank = 4", "rank = 4\nprior = true"), r"\[recipe\] prior: true with none"),
    (SYNMOTION, ('type = "synmotion"\nrank = 4\nmotion_probability = 0.5', 'type = "motion"'),
     r"\[\[datasets\]\]: datasets used as prior"),
    (SYNMOTION_ALONE, ('type = "synmotion"\nrank = 4\nmotion_probability = 0.5', 'type = "motion"'),
     r"\[\[datasets\]\] motion_words: given for the motion recipe. Expected motion_words only with type = \"synmotion\""),
    (SYNMOTION, ('use = "prior"', 'use = "prior"\nmotion_words = "runs"'),
     r"\[\[datasets\]\] prior motion_words: given for prior"),
])
def test_a_bad_synmotion_config_is_refused_naming_the_key(workspace, text, edit, match):
    old, new = edit
    assert old in text
    with pytest.raises(ValueError, match=match):
        load_config(config_file(workspace, text.replace(old, new, 1), "bad_synmotion.toml"))


@pytest.mark.parametrize("old, new, match", [
    ('motion_words = "mtn runs"', 'motion_words = "mtn grass"',
     r"\[\[datasets\]\] clips motion_words: 'grass' is not in the prompt 'a dog mtn runs'"),
    ('trigger_words = "a dog, a cat"', 'trigger_words = "a dog"',
     r"\[\[datasets\]\] clips trigger_words: none of 'a dog' is in the caption 'a cat mtn runs'"),
])
def test_synmotion_words_not_in_a_caption_are_refused_naming_the_key(workspace, old, new, match):
    text = SYNMOTION.replace(old, new).replace('folder = "out_synmotion"', 'folder = "out_bad_words"')
    config = load_config(config_file(workspace, text, "bad_words.toml"))
    with pytest.raises(ValueError, match=match):
        train_from_config(config)
    assert not (workspace / "out_bad_words").exists()


@pytest.mark.parametrize("example", ["train_subject.toml", "train_motion.toml", "train_synmotion.toml"])
def test_the_shipped_configs_are_valid(workspace, tmp_path, example):
    import re

    text = (Path(__file__).parent.parent / "configs" / example).read_text()
    where = {"path": workspace / "wan", "vae": workspace / "wan" / "vae", "text_encoder": workspace / "wan" / "text_encoder",
             "tokenizer": workspace / "wan" / "tokenizer", "folder": tmp_path / "out"}
    datasets = iter({"train_subject.toml": [workspace / "photos", workspace / "clips"],
                     "train_motion.toml": [workspace / "clips"],
                     "train_synmotion.toml": [workspace / "clips", workspace / "prior"]}[example])
    text = re.sub(r'^path = "\.\./data/[^"]*"', lambda m: f'path = "{next(datasets)}"', text, flags=re.M)
    text = re.sub(r'^(\w+) = "\.\./[^"]*"', lambda m: f'{m[1]} = "{where[m[1]]}"', text, flags=re.M)
    config = load_config(config_file(tmp_path, text))
    assert config.recipe == example.removeprefix("train_").removesuffix(".toml")
    assert config.optim.steps == (1000 if config.recipe == "synmotion" else 300)


def test_prompts_are_encoded_as_wans_pipelines_and_comfyui_do(workspace):
    """The prompt's tokens' hidden states, then zeros to 512 rows; the trigger words found among the rows."""
    from transformers import UMT5EncoderModel

    from custvid_core.training.config import ModelConfig, _text_encoder

    text = _text_encoder(ModelConfig(workspace / "wan"), torch.device("cpu"), torch.float32)
    context = text(["a sks dog", "a dog mtn runs on the grass"])
    assert context.shape == (2, 512, 64)
    ids = torch.tensor([[WORDS.index(w) for w in ("a", "sks", "dog", "</s>")]])
    with torch.no_grad():
        alone = UMT5EncoderModel.from_pretrained(workspace / "wan" / "text_encoder")(ids).last_hidden_state
    assert torch.allclose(context[0, :4], alone[0], atol=1e-5)  # the padding does not reach the prompt's rows
    assert context[0, 4:].abs().max() == 0 and context[1, 7].abs().max() > 0 and context[1, 8:].abs().max() == 0
    assert text.positions("a sks dog on the grass", "sks dog", "trigger_words") == (1, 2)
