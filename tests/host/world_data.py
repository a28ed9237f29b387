"""The shapes world's data the host tests train on, made through the pack's own dataset nodes."""

import torch

from custvid_core.world.scene import Scene, WorldSpec, render


def encode(clip, text):
    """What CLIP Text Encode gives for `text`."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def weights(patcher):
    """A copy of a MODEL's diffusion-model weights, to check later that nothing changed them."""
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def sample(model, clip, latent, prompt, steps=3, seed=0):
    """What the stock KSampler makes of `prompt` (euler, simple, cfg 3) from `latent`."""
    import nodes as comfy_nodes

    positive, negative = encode(clip, prompt), encode(clip, "")
    return comfy_nodes.KSampler().sample(model, seed, steps, 3.0, "euler", "simple", positive, negative,
                                         latent)[0]["samples"]


def star_photos(count):
    """`count` photos of an orange star a little further right each time, and their masks."""
    photos = [render(Scene(colour="orange", shape="star", start=(10 + 4 * i, 16)), WorldSpec(frames=1))
              for i in range(count)]
    return torch.cat([p.frames for p in photos]), torch.cat([p.masks for p in photos])


def star_and_two_clips(training_nodes, clip, vae):
    """A subject dataset of two star photos ("sks") and a clips dataset of a clip moving right and one moving down."""
    images, masks = star_photos(2)
    subject = training_nodes.SubjectDataset.execute(vae, images, encode(clip, "sks"), masks=masks).result[0]
    clips = None
    for direction in ("right", "down"):
        clip_scene = render(Scene(direction=direction), WorldSpec())
        clips = training_nodes.VideoDataset.execute(vae, clip_scene.frames, encode(clip, clip_scene.prompt),
                                                    add_to=clips).result[0]
    return subject, clips


def world_training_inputs(base, training_nodes, world_nodes):
    """ComfyUI's output, LoRA and DualReal folders under `base`; the shipped world loaded by ComfyUI's own loader;
    its CLIP and VAE; and `star_and_two_clips`: (patcher, clip, subject, clips)."""
    import comfy.sd
    import folder_paths

    from custvid_core.world.model import MODEL_FILE, load_world

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.add_model_folder_path("custvid_dualreal", str(base / "dualreal"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    patcher = comfy.sd.load_diffusion_model(str(MODEL_FILE))
    clip, vae = world_nodes.world_clip(load_world().text), world_nodes.WorldVAE()
    return (patcher, clip, *star_and_two_clips(training_nodes, clip, vae))
