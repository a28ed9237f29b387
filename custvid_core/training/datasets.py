"""Training sets: what the recipes learn from, encoded once, and the builders that make them.

A set holds latents, their text conditioning and what the losses need beside them (masks on the latent
grid, DINOv2 tokens, RAFT flow, single frames as stills). The builders take pixels and an `encode`
callable (a VAE's encode: pixels `[N, F, H, W, 3]` in [0, 1] -> latents `[N, C, T, h, w]`; a photo is a clip
of one frame) and make everything derived from the pixels here: stills of clips, copies of clips in other
colours (`images.hue_rotations`), a subject's photos as moving clips (`images.moving_photos`) and masks on
the latent grid (`objectives.latent_mask`) and, for an image-to-video model, each item's start image encoded as
ComfyUI's WanImageToVideo encodes it (`start_image_video`). The ComfyUI nodes and the shapes world build their sets through
them; sets built separately are joined with `append_clips` / `append_photos`.

Items of mixed sizes and lengths are fitted to buckets (`buckets.BucketRule`, given as `buckets=`): the set is then
a `Bucketed` one, a set of each kind per bucket, and every batch comes from one bucket (`draw_bucket`, by the
run's generator, weighted by the buckets' item counts).

    clips = clip_set(frames, vae_encode, context, hue_copies=3)
    subject = subject_set(photos, vae_encode, context, masks=masks, preservation=clips, moving_clips=2)
    mixed = clip_set([clip_a, clip_b], vae_encode, context, buckets=BucketRule(832, 480))
    i2v_clips = clip_set(frames, vae_encode, context, start_images=True, clip_features=clip_vision_features)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence, Union

import torch

from ..errors import InputError
from ..images import as_image_list, as_mask_list, hue_rotations, moving_photos
from .buckets import Bucket, BucketRule, fit_clip, fit_flow, fit_image, fit_mask, fit_patch_tokens
from .objectives import latent_mask

if TYPE_CHECKING:
    from ..representations.subject import SubjectRepresentation

Encode = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass
class VideoSet:
    """Cached clips: latents `[N, C, T, h, w]`, context `[N, L, D]`, optional RAFT flow `[N, F-1, 2, H, W]`,
    and optional stills `[N, K, C, 1, h, w]`: K single frames of each clip encoded as images, which the
    motion recipe's spatial phase learns from (MotionDirector trains it on single frames). For an image-to-video
    model: `start` `[N, C, T, h, w]`, each clip's first frame as its start image (`start_image_video`, encoded;
    a still is its own start image), and optionally `clip_features` `[1 or N, 257, D]`, CLIP vision's features of
    the start images (Wan 2.1 I2V)."""

    latents: torch.Tensor
    context: torch.Tensor
    flow: torch.Tensor | None = None
    stills: torch.Tensor | None = None
    start: torch.Tensor | None = None
    clip_features: torch.Tensor | None = None

    def __post_init__(self):
        _check_set("clips", self.latents, self.context, 5)
        _check_start("clips", self.start, self.clip_features, self.latents)
        if self.flow is not None and self.flow.shape[0] != self.latents.shape[0]:
            raise InputError("motion representation", f"{self.flow.shape[0]} flows for {self.latents.shape[0]} clips",
                             "one motion representation per clip")
        if self.stills is not None and self.stills.shape[0] != self.latents.shape[0]:
            raise InputError("frames", f"stills of {self.stills.shape[0]} clips for {self.latents.shape[0]} clips",
                             "single frames of every clip")


@dataclass
class MovingClips:
    """A subject's photos as short clips of it sliding over its own background (`images.moving_photos`):
    latents `[N, C, T, h, w]`, the photos' context `[1 or N, L, D]`, and the subject's masks on the latent
    grid `[N, 1, T, h, w]`; `photo`: which of the subject set's photos each clip shows `[N]` (where known: what
    ties a clip to its photo's own image embedding). Learned in turn with the photos, so the subject is not learned
    as something that stands still. `start`, `clip_features`: as `VideoSet`'s (a clip's features are its photo's)."""

    latents: torch.Tensor
    context: torch.Tensor
    masks: torch.Tensor
    photo: torch.Tensor | None = None
    start: torch.Tensor | None = None
    clip_features: torch.Tensor | None = None

    def __post_init__(self):
        _check_set("moving_clips", self.latents, self.context, 5)
        _check_start("moving_clips", self.start, self.clip_features, self.latents)
        _check_masks(self.masks, self.latents, "clip")
        if self.photo is not None and self.photo.shape != self.latents.shape[:1]:
            raise InputError("moving_clips", f"photo indices of shape {tuple(self.photo.shape)}",
                             f"one photo index per clip ({self.latents.shape[0]})")


@dataclass
class SubjectSet:
    """Cached subject images as one-frame latents `[N, C, 1, h, w]`, latent-grid masks `[N, 1, 1, h, w]`,
    context `[N, L, D]`, DINOv2 patch tokens `[N, D_dino, Gh, Gw]`, preservation clips, where the subject's
    trigger word sits in the context (for the token attention loss and a trigger embedding), and optionally
    the photos as moving clips (same prompt, same trigger words). For an image-to-video model, `start` and
    `clip_features` as `VideoSet`'s: each photo is its own start image (`start` is its latents)."""

    latents: torch.Tensor
    context: torch.Tensor
    masks: torch.Tensor | None = None
    dino_tokens: torch.Tensor | None = None
    preservation: VideoSet | Bucketed | None = None
    subject_tokens: tuple[int, ...] | None = None  # positions of the trigger word's tokens in the context
    trigger_words: str = ""  # the words at subject_tokens, kept with a trigger embedding learned there
    moving: MovingClips | None = None
    start: torch.Tensor | None = None
    clip_features: torch.Tensor | None = None

    def __post_init__(self):
        _check_set("subject images", self.latents, self.context, 5)
        _check_start("images", self.start, self.clip_features, self.latents)
        n = self.latents.shape[0]
        if self.masks is not None:
            _check_masks(self.masks, self.latents, "photo")
        if self.dino_tokens is not None and self.dino_tokens.shape[0] != n:
            raise InputError("subject representation", f"features of {self.dino_tokens.shape[0]} images",
                             f"features of the same {n} images")
        if self.moving is not None and self.moving.context.shape[1:] != self.context.shape[1:]:
            raise InputError("moving_clips", "their conditioning has another shape than the photos'",
                             "the photos' own prompt")


def _bucket_key(data: VideoSet | SubjectSet | MovingClips) -> tuple[int, ...]:
    """What items of one bucket share: their latents' frames, height and width (and a clip's count of stills)."""
    stills = getattr(data, "stills", None)
    return (*data.latents.shape[2:], 0 if stills is None else stills.shape[1])


# The input that gives a set's field, where it is named otherwise.
_INPUT_OF = {"start": "image_to_video", "clip_features": "clip_vision_output"}


@dataclass
class Bucketed:
    """A data set of items of several sizes or lengths: `sets`, one `VideoSet`, `SubjectSet` or `MovingClips` per
    bucket (all of one kind; a subject's buckets share their preservation clips and trigger words), and `labels`,
    each bucket's size in pixels and frames (None where it is not known: a set made without buckets and joined to
    bucketed ones). Every batch is drawn from one bucket (`draw_bucket`)."""

    sets: tuple
    labels: tuple[Bucket | None, ...]

    def __post_init__(self):
        self.sets, self.labels = tuple(self.sets), tuple(self.labels)
        if not self.sets or len(self.labels) != len(self.sets):
            raise InputError("buckets", f"{len(self.sets)} buckets with {len(self.labels)} labels",
                             "at least one bucket, each with its label")
        first = self.sets[0]
        for s in self.sets[1:]:
            if type(s) is not type(first):
                raise InputError("buckets", f"a {type(s).__name__} among {type(first).__name__}s",
                                 "buckets of one kind of data")
            if s.context.shape[2:] != first.context.shape[2:]:
                raise InputError("conditioning", "its width differs between buckets", "prompts from one text encoder")
            optional = [n for n in ("flow", "masks", "dino_tokens", "moving", "stills", "start", "clip_features")
                        if (getattr(s, n, None) is None) != (getattr(first, n, None) is None)]
            if optional:
                raise InputError(_INPUT_OF.get(optional[0], optional[0]), "given for the items of some sizes and not "
                                 "others", "the same kinds of data for every item, or for none")
            if s.clip_features is not None and s.clip_features.shape[1:] != first.clip_features.shape[1:]:
                raise InputError("clip_vision_output", "features of another shape in one bucket than another's",
                                 "the same CLIP vision model for all items")
            shared = [n for n in ("subject_tokens", "trigger_words") if getattr(s, n, None) != getattr(first, n, None)]
            if shared or getattr(s, "preservation", None) is not getattr(first, "preservation", None):
                raise InputError("add_to", "photos of other sizes with other trigger words or preservation clips",
                                 "one subject's photos, with one prompt's trigger words and one set of preservation "
                                 "clips")
        if len({_bucket_key(s) for s in self.sets}) != len(self.sets):
            raise InputError("buckets", "two buckets of the same size", "one bucket per size and length")

    @property
    def preservation(self):
        """A subject's preservation clips (its buckets share them)."""
        return self.sets[0].preservation

    @property
    def subject_tokens(self) -> tuple[int, ...] | None:
        return self.sets[0].subject_tokens

    @property
    def trigger_words(self) -> str:
        return self.sets[0].trigger_words

    @property
    def counts(self) -> list[int]:
        """Items per bucket."""
        return [s.latents.shape[0] for s in self.sets]

    def describe(self, items: str = "items") -> list[str]:
        """One line per bucket: its size and how many items it holds (`items`: what they are, in the plural)."""
        return [f"{label if label is not None else 'latent ' + 'x'.join(map(str, _bucket_key(s)[:3]))}: "
                f"{n} {items if n != 1 else items.removesuffix('s')}"
                for label, s, n in zip(self.labels, self.sets, self.counts)]


AnyClips = Union[VideoSet, Bucketed]
AnyPhotos = Union[SubjectSet, Bucketed]


def buckets_of(data) -> tuple:
    """The sets a data set draws its batches from: a `Bucketed` set's buckets, or the set itself."""
    return data.sets if isinstance(data, Bucketed) else (data,)


def draw_bucket(data, g: torch.Generator) -> int:
    """The bucket a batch comes from: drawn with the run's generator, each bucket as likely as its share of the
    items. A set of one bucket draws nothing, so it trains exactly as the set itself."""
    if not isinstance(data, Bucketed) or len(data.sets) == 1:
        return 0
    return int(torch.multinomial(torch.tensor(data.counts, dtype=torch.float), 1, generator=g))


def single_size(data, input_name: str):
    """`data` as one plain set, refusing a bucketed one of several sizes (for recipes that learn from one size)."""
    sets = buckets_of(data)
    if len(sets) > 1:
        raise InputError(input_name, f"items of {len(sets)} sizes ({', '.join(data.describe())})",
                         "items of one size and length for this recipe; off 'buckets' or one size of items")
    return sets[0]


def _check_set(what: str, latents: torch.Tensor, context: torch.Tensor, ndim: int) -> None:
    if latents.ndim != ndim or latents.shape[0] == 0:
        raise InputError(what, "the data set is empty" if latents.numel() == 0 else f"shape {tuple(latents.shape)}",
                         "at least one item")
    if context.shape[0] not in (1, latents.shape[0]):
        raise InputError("prompt", f"{context.shape[0]} conditionings for {latents.shape[0]} items",
                         "one prompt for all items or one per item")


def _check_start(what: str, start: torch.Tensor | None, clip_features: torch.Tensor | None,
                 latents: torch.Tensor) -> None:
    if start is not None and start.shape != latents.shape:
        raise InputError(what, f"start images of latent shape {tuple(start.shape)} for items of {tuple(latents.shape)}",
                         "one start image per item, encoded as long and as large as the item")
    if clip_features is not None:
        if start is None:
            raise InputError("clip_vision_output", "CLIP features without start images",
                             "start images encoded with the items (image_to_video on)")
        if clip_features.ndim != 3 or clip_features.shape[0] not in (1, latents.shape[0]):
            raise InputError("clip_vision_output", f"features of shape {tuple(clip_features.shape)} for "
                             f"{latents.shape[0]} items", "CLIP Vision Encode of one image for all items or one per item")


def _check_masks(masks: torch.Tensor, latents: torch.Tensor, item: str) -> None:
    n = latents.shape[0]
    if masks.shape[0] != n or masks.shape[-2:] != latents.shape[-2:]:
        raise InputError("masks", f"{masks.shape[0]} masks of grid {tuple(masks.shape[-2:])}",
                         f"{n} masks, one per {item}, of the {item}s' size")
    empty = torch.nonzero(masks.flatten(1).amax(1) <= 0).flatten().tolist()
    if empty:  # nothing to learn there: the region loss and the attention loss would be zero
        raise InputError("masks", f"mask {empty[0]} is empty", f"masks that mark the subject (white) in every {item}")


class _Encoding:
    """`encode` (and `encode_still` for single images) applied one item at a time, reporting each item done."""

    def __init__(self, encode: Encode, encode_still: Encode | None, total: int, progress: Progress | None,
                 description: str):
        self.encode, self.encode_still = encode, encode_still or (lambda photos: encode(photos[:, None]))
        self.total, self.done, self.progress, self.bar = total, 0, progress, None
        if progress is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit="item")

    def _count(self, latents: torch.Tensor) -> torch.Tensor:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.done == self.total:
                self.bar.close()
        else:
            self.progress(self.done, self.total)
        return latents.float().cpu()

    def clips(self, clips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Clips `[F, H, W, 3]` -> latents `[N, C, T, h, w]`."""
        return torch.cat([self._count(self.encode(c[None])) for c in clips])

    def stills(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images `[H, W, 3]` -> latents `[N, C, 1, h, w]`."""
        return torch.cat([self._count(self.encode_still(i[None])) for i in images])


def start_image_video(image: torch.Tensor, frames: int) -> torch.Tensor:
    """What an image-to-video Wan sees of a start image `[H, W, 3]`: a clip `[frames, H, W, 3]` of the image followed by
    grey (0.5) frames, to be encoded as one clip (ComfyUI's WanImageToVideo, diffusers' Wan I2V pipeline)."""
    clip = torch.full((frames, *image.shape), 0.5, dtype=image.dtype)
    clip[0] = image
    return clip


def _clip_features(features: torch.Tensor | None, items: int) -> torch.Tensor | None:
    if features is not None and (features.ndim != 3 or features.shape[0] not in (1, items)):
        raise InputError("clip_vision_output", f"features of shape {tuple(features.shape)} for {items} items",
                         "CLIP Vision Encode of one image for all items or one per item")
    return None if features is None else features.float().cpu()


def _still_frames(frame_count: int, stills: int | None) -> list[int]:
    """`stills` evenly spaced frames of a clip (all of them for None)."""
    count = frame_count if stills is None else min(stills, frame_count)
    return torch.linspace(0, frame_count - 1, count).round().long().tolist()


def _grouped(labels: Sequence[Bucket]) -> dict[Bucket, list[int]]:
    """Item indices per bucket, buckets in order of their first item."""
    groups: dict[Bucket, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return groups


def _context_rows(context: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The conditioning (or CLIP features) of items `idx` (one row stands for all items)."""
    return context if context.shape[0] == 1 else context[idx]


def _flow_list(flow: torch.Tensor | Sequence[torch.Tensor] | None, clips: list[torch.Tensor]) -> list | None:
    """The clips' RAFT flows, one `[F-1, 2, H, W]` per clip, checked against the clips."""
    if flow is None:
        return None
    flows = [flow] if isinstance(flow, torch.Tensor) and flow.ndim == 4 else list(flow)
    frames = [f.shape[0] + 1 for f in flows]
    if len(flows) != len(clips) or any(n != c.shape[0] for n, c in zip(frames, clips)):
        raise InputError("motion_representation", f"flow of {len(flows)} clips of {', '.join(map(str, frames))} frames",
                         f"the representation of these {len(clips)} clips "
                         f"({', '.join(str(c.shape[0]) for c in clips)} frames)")
    return [f.float() for f in flows]


def clip_set(frames: torch.Tensor | Sequence[torch.Tensor], encode: Encode, context: torch.Tensor,
             flow: torch.Tensor | Sequence[torch.Tensor] | None = None, stills: int | None = 8, hue_copies: int = 0,
             encode_still: Encode | None = None, progress: Progress | None = None,
             buckets: BucketRule | None = None, start_images: bool = False,
             clip_features: torch.Tensor | None = None) -> VideoSet | Bucketed:
    """Clips encoded for training (motion clips, or a subject's preservation clips).

    frames: clips `[N, F, H, W, 3]` in [0, 1] (or one clip `[F, H, W, 3]`, or a list of clips), all of one length
        and size unless `buckets` is given.
    context: their text conditioning, `[1, L, D]` for all or `[N, L, D]` one per clip.
    flow: their RAFT flow (the motion representation) `[N, F-1, 2, H, W]` (or `[F-1, 2, H, W]` for one clip, or a
        list of one per clip).
    stills: how many single frames of each clip (evenly spaced) are also encoded as images, for the motion
        recipe's spatial phase and a stillness LoRA; None: every frame, 0: none.
    hue_copies: after each clip, this many copies with its colours turned round the colour circle (same
        conditioning, same flow), so a motion LoRA cannot learn the clips' colours.
    encode_still: images `[N, H, W, 3]` -> one-frame latents `[N, C, 1, h, w]`, where a photo is not a clip of one
        frame to `encode` (default: `encode` on one-frame clips).
    progress: `progress(done, total)` after each encoded item (default: a tqdm bar).
    buckets: fit every clip (and its flow) to its bucket (`buckets.BucketRule`) and return a `Bucketed` set, one
        `VideoSet` per bucket; None: one `VideoSet` of clips that must share their length and size.
    start_images: for an image-to-video model, also encode each clip's (and hue copy's) first frame as its start
        image (`start_image_video`; in buckets, the fitted clip's first frame); clip_features: CLIP vision's features
        of the first frames `[1 or N, 257, D]` (Wan 2.1 I2V), not with hue copies (they would show the original
        colours)."""
    clips = [frames] if isinstance(frames, torch.Tensor) and frames.ndim == 4 else list(frames)
    if not clips:
        raise InputError("frames", "no clips were given", "at least one clip")
    for c in clips:
        if c.ndim != 4 or c.shape[-1] not in (3, 4) or c.shape[0] < 2:
            raise InputError("frames", f"a clip of shape {tuple(c.shape)}",
                             "a clip of at least 2 frames (5 or more on Wan), [frames, height, width, 3]")
    if context.shape[0] not in (1, len(clips)):
        raise InputError("conditioning", f"{context.shape[0]} conditionings for {len(clips)} clips",
                         "one for all clips or one per clip")
    if clip_features is not None and hue_copies:
        raise InputError("hue_copies", "the CLIP features show the clips' own colours, not their copies'",
                         "0 with clip_vision_output connected")
    if clip_features is not None and not start_images:
        raise InputError("image_to_video", "off with CLIP features given", "on, for an image-to-video model's clips")
    features = _clip_features(clip_features, len(clips))
    flows = _flow_list(flow, clips)
    if buckets is None:
        if len({tuple(c.shape[:3]) for c in clips}) != 1:
            raise InputError("frames", "clips of different lengths or sizes",
                             "clips of the same frame count and size, or buckets on")
        groups: dict = {None: list(range(len(clips)))}
    else:
        labels = [buckets.bucket_for(c.shape[2], c.shape[1], c.shape[0]) for c in clips]
        clips = [fit_clip(c, b) for c, b in zip(clips, labels)]
        flows = None if flows is None else [fit_flow(f, b) for f, b in zip(flows, labels)]
        groups = _grouped(labels)
    picks = {label: _still_frames(clips[idx[0]].shape[0], stills) if stills != 0 else []
             for label, idx in groups.items()}
    total = sum(len(idx) * (hue_copies + 1) * (1 + len(picks[label]) + int(start_images))
                for label, idx in groups.items())
    encoding = _Encoding(encode, encode_still, total, progress, "encoding clips")
    sets = []
    for label, idx in groups.items():
        versions = [v for i in idx for v in hue_rotations(clips[i][..., :3], hue_copies)]
        rows = _context_rows(context, idx)
        rows = rows.repeat_interleave(hue_copies + 1, 0) if rows.shape[0] > 1 else rows
        group_flow = None if flows is None else \
            torch.stack([flows[i] for i in idx]).repeat_interleave(hue_copies + 1, 0)
        latents = encoding.clips(versions)
        still_latents = torch.stack([encoding.stills(v[picks[label]]) for v in versions]) if picks[label] else None
        start = encoding.clips([start_image_video(v[0], v.shape[0]) for v in versions]) if start_images else None
        group_features = None if features is None else _context_rows(features, idx)
        sets.append(VideoSet(latents, rows, group_flow, still_latents, start, group_features))
    return sets[0] if buckets is None else Bucketed(tuple(sets), tuple(groups))


def subject_set(photos: torch.Tensor | Sequence[torch.Tensor], encode: Encode, context: torch.Tensor,
                masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
                subject_representation: SubjectRepresentation | None = None,
                preservation: AnyClips | None = None, subject_tokens: tuple[int, ...] | None = None,
                trigger_words: str = "", moving_clips: int = 0, moving_frames: int = 17,
                travel: tuple[float, float] = (0.225, 0.3), seed: int = 0, frame_step: int = 1,
                encode_still: Encode | None = None, progress: Progress | None = None,
                buckets: BucketRule | None = None, start_images: bool = False,
                clip_features: torch.Tensor | None = None) -> SubjectSet | Bucketed:
    """A subject's photos encoded for training.

    photos: `[N, H, W, 3]` in [0, 1] (or a list of `[H, W, 3]`), all of one size unless `buckets` is given; masks:
        the subject in each, `[N, H, W]` in [0, 1] (or a list), for the region and token attention losses, and
        moving clips.
    context: the training prompt's conditioning, `[1, L, D]` or one per photo.
    subject_representation: the photos' DINOv2 features (`representations.subject.SubjectRepresentation`),
        for subject alignment.
    preservation: captioned clips (`clip_set`) learned in turn, so the model keeps making video.
    subject_tokens, trigger_words: where the trigger words sit in the context, and the words.
    moving_clips: per photo, this many clips of `moving_frames` frames of the subject (cut out by its mask)
        sliding along a random straight path over the photo's background; each path is `travel` (a range) of
        the photo's width long; deterministic by `seed`. `frame_step`: the encoder's frames per latent frame
        (Wan: 4), which `moving_frames` must fit (1 + k steps or k steps).
    encode_still, progress: as for `clip_set`.
    buckets: fit every photo (its mask and DINOv2 features with it) to its size bucket (`buckets.BucketRule`; the
        moving clips are made from the fitted photos) and return a `Bucketed` set, one `SubjectSet` per bucket.
    start_images: for an image-to-video model, each photo is its own start image and each moving clip's first frame
        is encoded as its start image; clip_features: CLIP vision's features of the photos `[1 or N, 257, D]`."""
    images = as_image_list(photos, "images")
    if buckets is None and len({tuple(i.shape) for i in images}) != 1:
        raise InputError("images", "photos of different sizes", "photos of one size in one dataset, or buckets on")
    mask_list = as_mask_list(masks, images, "masks")
    if subject_representation is not None and subject_representation.patch_tokens.shape[0] != len(images):
        raise InputError("subject_representation", f"features of {subject_representation.patch_tokens.shape[0]} "
                         "images", f"the representation of these {len(images)} photos")
    if context.shape[0] not in (1, len(images)):
        raise InputError("prompt", f"{context.shape[0]} conditionings for {len(images)} photos",
                         "one prompt for all photos or one per photo")
    if moving_clips:
        if mask_list is None:
            raise InputError("moving_clips", "the subject is cut out by its mask, and no masks were given",
                             "masks for the photos, or 0")
        if moving_frames % frame_step not in (0, 1 % frame_step):
            raise InputError("moving_frames", f"{moving_frames} frames",
                             f"a count this VAE encodes whole: 1 + {frame_step}k or {frame_step}k (Wan: 17, 33, ...)")
    if clip_features is not None and not start_images:
        raise InputError("image_to_video", "off with CLIP features given", "on, for an image-to-video model's photos")
    features = _clip_features(clip_features, len(images))
    tokens = None if subject_representation is None else \
        subject_representation.patch_tokens.permute(0, 3, 1, 2).float().contiguous()
    if buckets is None:
        groups: dict = {None: list(range(len(images)))}
    else:
        labels = [buckets.bucket_for(i.shape[1], i.shape[0]) for i in images]
        if tokens is not None:
            tokens = [fit_patch_tokens(t, tuple(i.shape[:2]), subject_representation.fit, b).permute(2, 0, 1)
                      for t, i, b in zip(subject_representation.patch_tokens, images, labels)]
        images = [fit_image(i, b) for i, b in zip(images, labels)]
        mask_list = None if mask_list is None else [fit_mask(m, b) for m, b in zip(mask_list, labels)]
        groups = _grouped(labels)
    encoding = _Encoding(encode, encode_still, len(images) * (1 + moving_clips * (1 + int(start_images))), progress,
                         "encoding photos")
    sets = []
    for k, idx in enumerate(groups.values()):
        group_images = [images[i] for i in idx]
        group_masks = None if mask_list is None else [mask_list[i] for i in idx]
        clips = clip_masks = None
        if moving_clips:  # each bucket's clips draw from their own seed, the first bucket's from `seed`
            clips, clip_masks = moving_photos(group_images, group_masks, moving_clips, moving_frames, travel, seed + k)
        rows = _context_rows(context, idx)
        group_features = None if features is None else _context_rows(features, idx)
        latents = encoding.stills(group_images)
        grid_masks = None if group_masks is None else latent_mask(torch.stack(group_masks)[:, None], latents.shape)
        moving = None
        if clips is not None:
            clip_latents = encoding.clips(clips)
            clip_start = encoding.clips([start_image_video(c[0], c.shape[0]) for c in clips]) if start_images else None
            # `moving_photos` gives each photo's clips in turn: a prompt (and CLIP features) per photo becomes one per
            # clip.
            per_clip = [None if t is None else t.repeat_interleave(moving_clips, 0) if t.shape[0] > 1 else t
                        for t in (rows, group_features)]
            moving = MovingClips(clip_latents, per_clip[0], latent_mask(clip_masks, clip_latents.shape),
                                 torch.arange(len(idx)).repeat_interleave(moving_clips), clip_start, per_clip[1])
        group_tokens = None if tokens is None else torch.stack([tokens[i] for i in idx])
        sets.append(SubjectSet(latents, rows, grid_masks, group_tokens, preservation, subject_tokens, trigger_words,
                               moving, latents if start_images else None, group_features))
    return sets[0] if buckets is None else Bucketed(tuple(sets), tuple(groups))


def _append_context(earlier: torch.Tensor, n_old: int, context: torch.Tensor, n_new: int, what: str) -> torch.Tensor:
    """One conditioning row per item of a joined set (a single row stands for all of its items)."""
    if earlier.shape[1:] != context.shape[1:]:
        raise InputError("conditioning", f"its shape differs from the earlier {what}'",
                         "prompts from the same text encoder")
    return torch.cat([earlier.expand(n_old, -1, -1), context.expand(n_new, -1, -1)])


def _append_start(earlier, new, what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The joined set's start images and CLIP features (`VideoSet`s, `MovingClips` or `SubjectSet`s)."""
    if (earlier.start is None) != (new.start is None):
        raise InputError("image_to_video", f"on for some {what} and off for others", f"the same for all {what}")
    if (earlier.clip_features is None) != (new.clip_features is None):
        raise InputError("clip_vision_output", f"connected for some {what} and not others",
                         f"connected for all {what} or for none")
    if earlier.start is None:
        return None, None
    features = None
    if new.clip_features is not None:
        if earlier.clip_features.shape[1:] != new.clip_features.shape[1:]:
            raise InputError("clip_vision_output", f"features of another shape than the earlier {what}'",
                             "the same CLIP vision model for all")
        n_old, n_new = earlier.latents.shape[0], new.latents.shape[0]
        features = torch.cat([earlier.clip_features.expand(n_old, -1, -1), new.clip_features.expand(n_new, -1, -1)])
    return torch.cat([earlier.start, new.start]), features


def _append_bucketed(earlier, new, join: Callable) -> Bucketed:
    """`new`'s buckets joined to `earlier`'s: each bucket's items to those of the same size (by `join`), new sizes
    as new buckets after them."""
    sets, labels = list(buckets_of(earlier)), list(getattr(earlier, "labels", (None,)))
    keys = [_bucket_key(s) for s in sets]
    for item_set, label in zip(buckets_of(new), getattr(new, "labels", (None,))):
        key = _bucket_key(item_set)
        if key in keys:
            k = keys.index(key)
            sets[k], labels[k] = join(sets[k], item_set), labels[k] or label
        else:
            sets.append(item_set)
            labels.append(label)
            keys.append(key)
    return Bucketed(tuple(sets), tuple(labels))


def append_clips(earlier: AnyClips, new: AnyClips, bucketed: bool = False) -> AnyClips:
    """`earlier`'s clips followed by `new`'s (of the same frame count and size). `bucketed`: clips of other sizes or
    lengths join as buckets of their own, and the result is a `Bucketed` set."""
    if bucketed or isinstance(earlier, Bucketed) or isinstance(new, Bucketed):
        if not bucketed:
            raise InputError("add_to", "clips in size buckets joined without buckets", "buckets on for every clip")
        return _append_bucketed(earlier, new, append_clips)
    if earlier.latents.shape[1:] != new.latents.shape[1:]:
        raise InputError("frames", f"latents {tuple(new.latents.shape[1:])} differ from the earlier clips' "
                         f"{tuple(earlier.latents.shape[1:])}", "clips of the same frame count and size")
    if (earlier.flow is None) != (new.flow is None):
        raise InputError("motion_representation", "given for some clips and not others",
                         "a motion representation for every clip, or for none")
    if (earlier.stills is None) != (new.stills is None) or \
            (new.stills is not None and earlier.stills.shape[1] != new.stills.shape[1]):
        raise InputError("frames", "clips with another number of stills after the earlier clips",
                         "clips of the same frame count and size")
    n_old, n_new = earlier.latents.shape[0], new.latents.shape[0]
    return VideoSet(torch.cat([earlier.latents, new.latents]),
                    _append_context(earlier.context, n_old, new.context, n_new, "clips"),
                    torch.cat([earlier.flow, new.flow]) if new.flow is not None else None,
                    torch.cat([earlier.stills, new.stills]) if new.stills is not None else None,
                    *_append_start(earlier, new, "clips"))


def _photos_after(moving: MovingClips, earlier_photos: int) -> MovingClips:
    """`moving` of photos that now follow `earlier_photos` photos in a joined set."""
    return replace(moving, photo=None if moving.photo is None else moving.photo + earlier_photos)


def _append_moving(earlier: MovingClips, new: MovingClips) -> MovingClips:
    """`new` follows `earlier` (both with their photos' indices already counted in the joined set)."""
    if earlier.latents.shape[1:] != new.latents.shape[1:]:
        raise InputError("moving_frames", "moving clips of another length or size than the earlier photos'",
                         "the same moving_frames and photo size in one dataset")
    n_old, n_new = earlier.latents.shape[0], new.latents.shape[0]
    known = earlier.photo is not None and new.photo is not None
    return MovingClips(torch.cat([earlier.latents, new.latents]),
                       _append_context(earlier.context, n_old, new.context, n_new, "photos"),
                       torch.cat([earlier.masks, new.masks]), torch.cat([earlier.photo, new.photo]) if known else None,
                       *_append_start(earlier, new, "photos"))


def _sharing(photos: AnyPhotos, shared: dict) -> AnyPhotos:
    """`photos` (every bucket) with `shared`'s preservation clips and trigger words."""
    if isinstance(photos, Bucketed):
        return Bucketed(tuple(replace(s, **shared) for s in photos.sets), photos.labels)
    return replace(photos, **shared)


def append_photos(earlier: AnyPhotos, new: AnyPhotos, bucketed: bool = False) -> AnyPhotos:
    """`earlier`'s photos (and moving clips) followed by `new`'s; `new`'s preservation clips and trigger words
    where it has them, else `earlier`'s. `bucketed`: photos of other sizes join as buckets of their own, and the
    result is a `Bucketed` set."""
    if bucketed or isinstance(earlier, Bucketed) or isinstance(new, Bucketed):
        if not bucketed:
            raise InputError("add_to", "photos in size buckets joined without buckets", "buckets on for every photo")
        last, first = buckets_of(new)[0], buckets_of(earlier)[0]
        shared = dict(preservation=last.preservation or first.preservation,
                      subject_tokens=last.subject_tokens or first.subject_tokens,
                      trigger_words=last.trigger_words if last.subject_tokens else first.trigger_words)
        return _append_bucketed(_sharing(earlier, shared), _sharing(new, shared), append_photos)
    n_old, n_new = earlier.latents.shape[0], new.latents.shape[0]
    if earlier.latents.shape[1:] != new.latents.shape[1:]:
        raise InputError("images", f"photos of latent size {tuple(new.latents.shape[-2:])} after photos of "
                         f"{tuple(earlier.latents.shape[-2:])}", "photos of the same size in one dataset")
    if (earlier.masks is None) != (new.masks is None) or (earlier.dino_tokens is None) != (new.dino_tokens is None):
        raise InputError("masks", "given for some photos and not others",
                         "masks (and subject representations) for every photo, or for none")
    later = None if new.moving is None else _photos_after(new.moving, n_old)
    moving = earlier.moving or later
    if earlier.moving is not None and later is not None:
        moving = _append_moving(earlier.moving, later)
    return SubjectSet(torch.cat([earlier.latents, new.latents]),
                      _append_context(earlier.context, n_old, new.context, n_new, "photos"),
                      torch.cat([earlier.masks, new.masks]) if new.masks is not None else None,
                      torch.cat([earlier.dino_tokens, new.dino_tokens]) if new.dino_tokens is not None else None,
                      new.preservation or earlier.preservation, new.subject_tokens or earlier.subject_tokens,
                      new.trigger_words if new.subject_tokens else earlier.trigger_words, moving,
                      *_append_start(earlier, new, "photos"))


def _or_none(convert: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else convert(t)


def converted(data, latents: Callable[[torch.Tensor], torch.Tensor],
              tensors: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
    """`data` (a `VideoSet`, `MovingClips` or `SubjectSet`, with its moving and preservation clips) with every
    latent tensor (latents, stills, start images) passed through `latents` (e.g. into a model's latent format) and every other
    tensor through `tensors`. A `VideoSet` keeps its kind and other fields (prior clips their prompts). A `Bucketed`
    set is converted bucket by bucket (its subject buckets keep sharing one set of preservation clips)."""
    if isinstance(data, Bucketed):
        sets = [converted(s, latents, tensors) for s in data.sets]
        if isinstance(data.sets[0], SubjectSet) and data.sets[0].preservation is not None:
            sets = [replace(s, preservation=sets[0].preservation) for s in sets]
        return Bucketed(tuple(sets), data.labels)
    if isinstance(data, VideoSet):
        stills = data.stills
        return replace(data, latents=latents(data.latents), context=tensors(data.context),
                       flow=_or_none(tensors, data.flow),
                       stills=None if stills is None else latents(stills.flatten(0, 1)).view(stills.shape),
                       start=_or_none(latents, data.start), clip_features=_or_none(tensors, data.clip_features))
    if isinstance(data, MovingClips):
        return MovingClips(latents(data.latents), tensors(data.context), tensors(data.masks), data.photo,
                           _or_none(latents, data.start), _or_none(tensors, data.clip_features))
    return SubjectSet(latents(data.latents), tensors(data.context), _or_none(tensors, data.masks),
                      _or_none(tensors, data.dino_tokens),
                      None if data.preservation is None else converted(data.preservation, latents, tensors),
                      data.subject_tokens, data.trigger_words,
                      None if data.moving is None else converted(data.moving, latents, tensors),
                      _or_none(latents, data.start), _or_none(tensors, data.clip_features))
