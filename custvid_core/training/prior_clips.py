"""Subject prior clips: what the frozen base model itself makes of "<subject class> <common action>" prompts.

SynMotion learns a motion so that it transfers to new subjects: on some steps the subject embedding learns from
clips of ordinary subjects doing ordinary things (its Subject Prior Videos), so it does not absorb the user's motion.
Those clips must come from the base model before any training (they carry its own prior, not real footage), so
they are generated here through a `generate(prompt_index, seed) -> latents` callable the caller supplies (the
shapes world's sampler, ComfyUI's sampler in a node), encoded with their prompts' conditioning, and cached in one
safetensors file keyed by everything that decides them: the base model's fingerprint, the prompts, the clip count,
the seed, the size, the frame count and the sampling settings. A matching cache is read back without generating.

    prompts = shipped_prior_prompts()
    clips = prior_clips(generate, prompts, encode_text, PriorSettings(count=20, width=832, height=480, frames=81),
                        base_model=model_fingerprint, cache_dir=folder)

Choices the paper leaves open: clip k uses prompt `k % len(prompts)` with noise seed `seed + k` (more clips than
prompts give other samples of the same prompts, not copies); each prompt's conditioning is stored once, with the
prompt index of every clip.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import InputError
from ..files import load_safetensors, save_safetensors
from .datasets import Progress, VideoSet
from .fingerprint import content_digest

KIND = "custvid.subject_prior_clips"
VERSION = 1
SEPARATOR = "|"
# "<subject class> | <common action>" per line: animals doing everyday things, as in SynMotion's Subject Prior Videos.
SHIPPED_PROMPTS_FILE = Path(__file__).parent / "prior_prompts_wan.txt"

# generate(prompt_index, seed) -> the clip's latents `[C, T, h, w]` (or `[1, C, T, h, w]`).
Generate = Callable[[int, int], torch.Tensor]
# encode_text(prompts) -> their conditioning `[P, L, D]`, one row block per prompt (umt5: padded to 512 rows).
EncodeText = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class PriorPrompt:
    """A prompt as its subject class and its action, kept apart: a SynMotion step finds the subject's words in it."""

    subject: str
    action: str

    @property
    def text(self) -> str:
        return f"{self.subject} {self.action}"


def parse_prior_prompts(text: str, input_name: str = "prompts") -> list[PriorPrompt]:
    """Lines of "<subject class> | <common action>" (e.g. "a dog | walking"); blank lines and `#` comments skipped."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        subject, separator, action = (part.strip() for part in line.partition(SEPARATOR))
        if not separator or not subject or not action or SEPARATOR in action:
            raise InputError(input_name, f"line {number} ('{line[:60]}') is not a subject and an action",
                             f"one prompt per line as '<subject class> {SEPARATOR} <common action>', e.g. 'a dog | walking'")
        prompts.append(PriorPrompt(subject, action))
    if not prompts:
        raise InputError(input_name, "no prompts were given", "at least one line such as 'a dog | walking'")
    return prompts


def shipped_prior_prompts() -> list[PriorPrompt]:
    """The prompts CustVid ships for Wan: common animals doing common actions."""
    return parse_prior_prompts(SHIPPED_PROMPTS_FILE.read_text(encoding="utf-8"), "shipped prior prompts")


def prompts_text(prompts: Sequence[PriorPrompt]) -> str:
    """Prompts as the lines `parse_prior_prompts` reads (a node's default text)."""
    return "\n".join(f"{p.subject} {SEPARATOR} {p.action}" for p in prompts)


@dataclass(frozen=True)
class PriorSettings:
    """What decides the generated clips besides the model and the prompts. `width`, `height`: in the caller's units
    (pixels, or latent cells where the caller knows no VAE). `sampling`: whatever else decides them (the sampler's
    name, scheduler, shift, the text encoder) as (name, value) pairs, so a cache made with other ones is not reused."""

    count: int = 20
    seed: int = 0
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 30
    cfg: float = 5.0
    sampling: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        checks = (("count", self.count >= 1, "at least 1 clip"), ("seed", self.seed >= 0, "a seed of 0 or more"),
                  ("width", self.width >= 1, "a positive width"), ("height", self.height >= 1, "a positive height"),
                  ("frames", self.frames >= 1, "at least 1 frame"), ("steps", self.steps >= 1, "at least 1 step"),
                  ("cfg", self.cfg > 0, "a positive guidance scale"))
        for name, ok, expected in checks:
            if not ok:
                raise InputError(name, f"{getattr(self, name)}", expected)


@dataclass
class PriorClips(VideoSet):
    """A `VideoSet` of prior clips (context one per clip), with each clip's prompt as subject and action and the
    fingerprint of the base model that generated them."""

    prompts: tuple[PriorPrompt, ...] = ()
    base_model: str = ""

    def require_model(self, base_model: str, input_name: str = "prior_clips") -> None:
        """Refuse clips another base model generated: they would teach the subject embedding another model's prior."""
        if base_model != self.base_model:
            raise InputError(input_name, "these clips were generated by another base model than the one being trained",
                             "prior clips generated by this MODEL (rerun Subject Prior Clips with it)")


def cache_key(prompts: Sequence[PriorPrompt], settings: PriorSettings, base_model: str) -> str:
    """The digest a cache is found by: the base model's fingerprint, the prompts and every setting."""
    return content_digest(KIND, VERSION, base_model, [asdict(p) for p in prompts], asdict(settings))


def cache_file(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"subject_prior_clips_{key[:24]}.safetensors"


def prior_clips(generate: Generate, prompts: Sequence[PriorPrompt], encode_text: EncodeText,
                settings: PriorSettings, base_model: str, cache_dir: str | Path,
                progress: Progress | None = None) -> PriorClips:
    """`settings.count` clips generated by the frozen base model for `prompts`, read from `cache_dir` when a cache
    of the same model, prompts and settings is there (no generation), else generated, encoded and cached.

    generate: `generate(prompt_index, seed)` -> latents of one clip, with the model left frozen (the caller's sampler).
    encode_text: prompts -> their conditioning `[P, L, D]`. base_model: the model's fingerprint (e.g.
    `fingerprint.model_signature`, or a host's digest of the model and its patches).
    progress: `progress(done, total)` after each clip (default: a tqdm bar); may raise to interrupt, which
    leaves no cache file."""
    prompts = list(prompts)
    if not prompts:
        raise InputError("prompts", "no prompts were given", "at least one '<subject class> | <common action>' prompt")
    key = cache_key(prompts, settings, base_model)
    path = cache_file(cache_dir, key)
    if path.exists():
        try:
            return load_prior_clips(path, base_model, "cache")
        except InputError as e:  # only this function writes it: it was damaged or emptied since, or put there by hand
            raise InputError("cache", f"the cached prior clips {path} cannot be used: {e.problem}",
                             "a cache this function wrote: delete that file and the clips are generated again") from None
    with torch.no_grad():
        context = encode_text([p.text for p in prompts])
    if context.ndim != 3 or context.shape[0] != len(prompts):
        raise InputError("text encoder", f"conditioning of shape {tuple(context.shape)} for {len(prompts)} prompts",
                         "one [tokens, width] conditioning per prompt")
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.count, desc="subject prior clips", unit="clip")
    index = torch.arange(settings.count) % len(prompts)
    clips = []
    for k in range(settings.count):
        with torch.no_grad():
            latents = generate(int(index[k]), settings.seed + k)
        latents = latents.detach().float().cpu()
        clips.append(latents[0] if latents.ndim == 5 and latents.shape[0] == 1 else latents)
        if clips[-1].ndim != 4 or clips[-1].shape != clips[0].shape:
            raise InputError("generate", f"clip {k} has latents of shape {tuple(latents.shape)}",
                             f"one clip's latents [channels, frames, height, width], all of shape {tuple(clips[0].shape)}")
        if bar is not None:
            bar.update(1)
        else:
            progress(k + 1, settings.count)
    if bar is not None:
        bar.close()
    save_safetensors(path, {"latents": torch.stack(clips), "context": context, "prompt_index": index},
                     {"custvid.kind": KIND, "custvid.version": VERSION, "custvid.key": key,
                      "custvid.base_model": base_model, "custvid.prompts": [asdict(p) for p in prompts],
                      "custvid.settings": asdict(settings)})
    return load_prior_clips(path, base_model, "cache")


def load_prior_clips(path: str | Path, base_model: str | None = None, input_name: str = "prior_clips") -> PriorClips:
    """A prior-clip cache file as a `PriorClips`; with `base_model`, one another model generated is refused."""
    tensors, meta = load_safetensors(path, input_name)
    name = Path(path).name
    if meta.get("custvid.kind") != KIND:
        raise InputError(input_name, f"'{name}' is not a subject prior clips file", "a file Subject Prior Clips wrote")
    if int(meta.get("custvid.version", 0)) > VERSION:
        raise InputError(input_name, f"'{name}' was written by a newer CustVid", "a file this version wrote (update CustVid)")
    latents = tensors.get("latents")
    if latents is None or latents.ndim != 5 or latents.shape[0] == 0:
        raise InputError(input_name, f"'{name}' holds no clips", "a cache of at least one generated clip (generate it again)")
    if base_model is not None and meta.get("custvid.base_model") != base_model:
        raise InputError(input_name, f"'{name}' was generated by another base model than this one",
                         "prior clips generated by the MODEL being trained (generate them again with it)")
    prompts = tuple(PriorPrompt(**p) for p in json.loads(meta["custvid.prompts"]))
    index = tensors["prompt_index"].long()
    return PriorClips(latents, tensors["context"][index], prompts=tuple(prompts[i] for i in index.tolist()),
                      base_model=meta["custvid.base_model"])

