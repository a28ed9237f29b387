"""The dataset nodes in a real ComfyUI: photos and clips of mixed sizes and lengths in buckets (off by default, as
saved workflows expect), listed under the node and trained from; a dataset cached to disk and trained from without
the VAE or text encoder; a cache of another VAE refused, naming it."""

import torch
from comfy_host import import_comfy, import_pack, tiny_wan_vae_weights
from safetensors.torch import save_file
from test_host_refusals import COMMON, graph, run

from custvid_core.world.model import MODEL_FILE, TEXT_FILE

BUDGET = dict(buckets=True, bucket_width=48, bucket_height=32)
WORLD = dict(
    unet=("UNETLoader", {"unet_name": MODEL_FILE.name, "weight_dtype": "default"}),
    world=("CustVid_LoadShapesWorldClip", {"text_encoder_name": TEXT_FILE.name}),
    case=("CustVid_WorldCaseData", {"case": "orange_star_circle", "motion_clip": 0}),
    cond=("CLIPTextEncode", {"clip": ["world", 0], "text": "a sks"}),
    # The case's photos and masks scaled to 48x32, and its 5-frame clip made 10 frames long and 8 frames long at 48x32.
    wide=("ImageScale", {"image": ["case", 0], "upscale_method": "bilinear", "width": 48, "height": 32,
                         "crop": "disabled"}),
    mask_image=("MaskToImage", {"mask": ["case", 1]}),
    wide_mask_image=("ImageScale", {"image": ["mask_image", 0], "upscale_method": "bilinear", "width": 48,
                                    "height": 32, "crop": "disabled"}),
    wide_mask=("ImageToMask", {"image": ["wide_mask_image", 0], "channel": "red"}),
    long=("ImageBatch", {"image1": ["case", 2], "image2": ["case", 2]}),
    eight=("ImageFromBatch", {"image": ["long", 0], "batch_index": 0, "length": 8}),
    wide_eight=("ImageScale", {"image": ["eight", 0], "upscale_method": "bilinear", "width": 48, "height": 32,
                               "crop": "disabled"}),
)
TRAIN_SUBJECT = dict(COMMON, steps=3, roles="self_attn.q", run_name="buckets_subject", preservation_weight=1.0,
                     region_loss=True)
TRAIN_MOTION = dict(COMMON, steps=3, roles="self_attn.v", run_name="buckets_motion", spatial_rank=0,
                    debiased_weight=1.0)


def _photos(buckets: bool) -> dict:
    on = BUDGET if buckets else {}
    return dict(
        photos=("CustVid_SubjectDataset", {"vae": ["world", 1], "images": ["case", 0], "conditioning": ["cond", 0],
                                           "masks": ["case", 1], **on}),
        subject=("CustVid_SubjectDataset", {"vae": ["world", 1], "images": ["wide", 0], "conditioning": ["cond", 0],
                                            "masks": ["wide_mask", 0], "add_to": ["photos", 0], **on}),
    )


def _clips(buckets: bool) -> dict:
    on = BUDGET if buckets else {}
    first = ("CustVid_VideoDataset", {"vae": ["world", 1], "frames": ["case", 2], "conditioning": ["cond", 0], **on})
    nodes = {"clips0": first}
    for k, frames in enumerate(("long", "wide_eight"), 1):
        nodes[f"clips{k}"] = ("CustVid_VideoDataset", {"vae": ["world", 1], "frames": [frames, 0],
                                                       "conditioning": ["cond", 0], "add_to": [f"clips{k - 1}", 0],
                                                       **on})
    return nodes


def _text(result, node):
    return "\n".join(result["outputs"][node]["text"])


def test_photos_and_clips_of_mixed_sizes_train_in_buckets_listed_under_the_node(comfy_server):
    result = run(comfy_server, graph(**WORLD, **_photos(True), **_clips(True),
                                     train=("CustVid_TrainSubjectLoRA", {"model": ["unet", 0], "subject": ["subject", 0],
                                                                         **TRAIN_SUBJECT}),
                                     motion=("CustVid_TrainMotionLoRA", {"model": ["unet", 0], "clips": ["clips2", 0],
                                                                         **TRAIN_MOTION}),
                                     out=("PreviewAny", {"source": ["train", 1]}),
                                     out2=("PreviewAny", {"source": ["motion", 1]})), timeout=900)
    assert result["ok"], result["error"]
    # The 32x32 photos take the budget's largest square; the 48x32 ones fit it exactly. The world's VAE encodes
    # 5-frame steps: the 8-frame clip is trimmed to 5, the 10-frame one kept whole.
    assert _text(result, "subject") == "2 buckets:\n38x38: 2 photos\n48x32: 2 photos"
    assert _text(result, "clips2") == "3 buckets:\n38x38x5: 1 clips\n38x38x10: 1 clips\n48x32x5: 1 clips"


def test_without_buckets_photos_of_another_size_are_refused_as_before(comfy_server):
    result = run(comfy_server, graph(**WORLD, **_photos(False), out=("PreviewAny", {"source": ["subject", 0]})))
    assert not result["ok"] and result["error"]["exception_type"] == "CustVid.InputError"
    assert "photos of the same size in one dataset" in result["error"]["exception_message"]
    clips = run(comfy_server, graph(**WORLD, **_clips(False), out=("PreviewAny", {"source": ["clips1", 0]})))
    assert not clips["ok"] and "clips of the same frame count and size" in clips["error"]["exception_message"]


def test_a_cached_dataset_trains_without_vae_or_text_encoder_and_another_vae_is_refused(comfy_server):
    save = graph(**WORLD, **_photos(True),
                 save=("CustVid_SaveDatasetCache", {"vae": ["world", 1], "clip": ["world", 0], "subject": ["subject", 0],
                                                    "filename": "custvid/mixed", "overwrite": True}))
    result = run(comfy_server, save)
    assert result["ok"], result["error"]
    path = comfy_server.base / "models" / "custvid" / "datasets" / "custvid" / "mixed.safetensors"
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert "38x38: 2 photos" in _text(result, "save")
    # A new prompt: the cache alone (no VAE, no text encoder loaded) trains the subject.
    trained = run(comfy_server, graph(
        unet=WORLD["unet"],
        load=("CustVid_LoadSubjectDatasetCache", {"dataset_name": "custvid/mixed.safetensors"}),
        train=("CustVid_TrainSubjectLoRA", {"model": ["unet", 0], "subject": ["load", 0],
                                            **dict(TRAIN_SUBJECT, run_name="from_cache")}),
        out=("PreviewAny", {"source": ["train", 1]})), timeout=900)
    assert trained["ok"], trained["error"]
    assert not any(n in trained["outputs"] for n in ("world", "case"))
    # The same check against the world's own VAE passes; ComfyUI's Wan VAE did not encode it: refused, naming it.
    vae_folder = comfy_server.base / "models" / "vae"
    vae_folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_wan_vae_weights().items()}, str(vae_folder / "tiny_wan_vae.safetensors"))
    checked = run(comfy_server, graph(
        world=WORLD["world"], load=("CustVid_LoadSubjectDatasetCache", {"dataset_name": "custvid/mixed.safetensors",
                                                                         "vae": ["world", 1], "clip": ["world", 0]}),
        out=("PreviewAny", {"source": ["load", 0]})))
    assert checked["ok"], checked["error"]
    refused = run(comfy_server, graph(
        wan_vae=("VAELoader", {"vae_name": "tiny_wan_vae.safetensors"}),
        load=("CustVid_LoadSubjectDatasetCache", {"dataset_name": "custvid/mixed.safetensors",
                                                  "vae": ["wan_vae", 0]}),
        out=("PreviewAny", {"source": ["load", 0]})))
    assert not refused["ok"] and refused["error"]["exception_type"] == "CustVid.InputError"
    assert "encoded by another VAE (WorldVAE" in refused["error"]["exception_message"]
    clips_loader = run(comfy_server, graph(
        load=("CustVid_LoadVideoDatasetCache", {"dataset_name": "custvid/mixed.safetensors"}),
        out=("PreviewAny", {"source": ["load", 0]})))
    assert not clips_loader["ok"] and "holds a subject" in clips_loader["error"]["exception_message"]
    assert comfy_server.alive()


def test_buckets_on_comfyuis_wan_vae_snap_to_16_pixels_and_trim_to_one_plus_four_k_frames():
    import_comfy()
    import comfy.sd

    training = import_pack().nodes.training_nodes
    vae = comfy.sd.VAE(sd=tiny_wan_vae_weights())
    context = [[torch.randn(1, 4, 64), {}]]
    clips = training.VideoDataset.execute(vae, torch.rand(12, 40, 100, 3), context, buckets=True, bucket_width=64,
                                          bucket_height=48).result[0]
    assert [str(b) for b in clips.labels] == ["80x32x9"] and clips.sets[0].latents.shape == (1, 16, 3, 4, 10)
