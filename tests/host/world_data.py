"""The shapes world's data the host tests train on, made through the pack's own dataset nodes."""

import torch

from custvid_core.world.scene import Scene, WorldSpec, render


def encode(clip, text):
    """What CLIP Text Encode gives for `text`."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


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
