"""Training from a config file: `python -m custvid_core train CONFIG.toml`.

A TOML file names the base model, the datasets, the recipe and its settings, and where the results go
(configs/train_subject.toml, configs/train_motion.toml, configs/train_synmotion.toml). `load_config` reads and
checks it into `TrainConfig`: every key is one of the fields of the settings it fills (`SubjectSettings`,
`MotionSettings`, `SynMotionSettings`, `OptimSettings`...),
an unknown key, a value of the wrong type or a missing file is refused naming it, and relative paths resolve against
the config file. `train_from_config` runs it host-free: the base model (a ComfyUI single-file Wan checkpoint, or
diffusers' `WanTransformer3DModel` folder or pipeline folder), the datasets encoded with diffusers'
`AutoencoderKLWan` and a UMT5 text encoder, the recipe by the same functions the nodes call, checkpoints a rerun
resumes, and the files the pack's save nodes write (LoRAs in ComfyUI's native keys, trigger embeddings, DualReal,
SynMotion embeddings).

    [model]      path, vae, text_encoder, tokenizer, dtype, training_dtype, device, text_tokens, raft, dino,
                 dino_resolution
    [[datasets]] path (a folder) or cache (a dataset cache file), kind ("photos" | "clips"), use ("subject" |
                 "motion" | "preservation" | "prior"), caption, trigger_words, motion_words, mask_folder, mask_suffix,
                 frames, stills, hue_copies, moving_clips, moving_frames, buckets, bucket_width, bucket_height
    [recipe]     type ("subject" | "motion" | "joint" | "dualreal" | "synmotion") and the recipe's settings; nested settings
                 as sub-tables ([recipe.optim], [recipe.sigmas], [recipe.memory]; a joint run's [recipe.subject],
                 [recipe.motion], [recipe.controller])
    [output]     folder, name, checkpoint_every, checkpoints
    [distributed] strategy ("ddp" | "fsdp": how a launch on several processes shares the model; default "ddp")
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, before it joined the standard library
    import tomli as tomllib

from ..errors import InputError
from .customize import JointController, MotionSettings, SubjectSettings
from .distributed import STRATEGIES, is_main_process, process_count, process_device, strategy_used
from .dualreal import DualRealSettings
from .engine import TRAINING_DTYPES, compute_dtype
from .loop import CHECKPOINT_FILE, OptimSettings, Progress
from .synmotion import SynMotionSettings

SECTIONS = ("model", "datasets", "recipe", "output", "distributed")
DATASET_KINDS = ("photos", "clips")
DATASET_USES = ("subject", "motion", "preservation", "prior")
DTYPES = ("auto", *TRAINING_DTYPES)  # auto: bf16 on a CUDA device that has it, else fp32
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
# What a recipe's data must hold: the uses it learns from and those it can do without.
RECIPE_USES = {"subject": ({"subject"}, {"preservation"}), "motion": ({"motion"}, set()),
               "joint": ({"subject", "motion"}, {"preservation"}), "dualreal": ({"subject", "motion"}, {"preservation"}),
               "synmotion": ({"motion"}, {"prior"})}
# Warm-up when a config sets none: 1/share of the steps, at most the recipe's default (the nodes' rule).
WARMUP_SHARE = {"subject": 10, "motion": 10, "joint": 10, "dualreal": 5, "synmotion": 10}
# diffusers' Wan pipelines pad the prompt's embedding with zeros to 512 tokens, as ComfyUI's UMT5 encoding does.
WAN_TEXT_TOKENS = 512
NOT_HOST_FREE = ("encode the dataset in ComfyUI instead (Subject Dataset / Video Clips Dataset), save it with Save "
                 "Dataset Cache and give the file as cache = \"...\" in [[datasets]]; or give the diffusers-layout folder "
                 "of the model's VAE / text encoder")


@dataclass
class JointSettings:
    """A joint run (`customize.train_joint`): the subject and motion settings, one optimiser for both, the share of
    motion steps and, optionally, DualReal's StageBlender controller over the two LoRAs."""

    subject: SubjectSettings = field(default_factory=SubjectSettings)
    motion: MotionSettings = field(default_factory=MotionSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(steps=600, lr=1e-4))
    motion_probability: float = 0.5
    controller: JointController | None = None


# The recipes a config can run -> their settings.
RECIPES = {"subject": SubjectSettings, "motion": MotionSettings, "joint": JointSettings, "dualreal": DualRealSettings,
           "synmotion": SynMotionSettings}


@dataclass
class ModelConfig:
    path: Path  # ComfyUI single file, diffusers transformer folder, or diffusers pipeline folder
    vae: Path | None = None  # diffusers AutoencoderKLWan folder (default: the pipeline's vae/)
    text_encoder: Path | None = None  # transformers UMT5 folder (default: the pipeline's text_encoder/)
    tokenizer: Path | None = None  # default: the pipeline's tokenizer/, else the text encoder's folder
    dtype: str = "auto"  # the weights' storage: auto = bf16 on CUDA, fp32 on a CPU
    training_dtype: str = "auto"  # engine.compute_dtype's: auto = bf16 on CUDA, fp32 on a CPU
    device: str = "auto"  # auto: the process's own GPU under a launcher (else the first), or the CPU
    text_tokens: int = WAN_TEXT_TOKENS
    raft: Path | None = None  # torchvision RAFT weights: the motion clips' flow, for MoRA (motion alignment)
    dino: Path | None = None  # DINOv2 weights (a folder or a file): the photos' features, for SuRA (subject alignment)
    dino_resolution: int = 448  # the square the photos are fitted to for DINOv2


@dataclass
class DatasetConfig:
    path: Path | None  # a folder of photos or clips, or None for a dataset cache
    kind: str  # "photos": a folder of images; "clips": a folder of video files and folders of frames
    use: str  # what the recipe learns it as (default: photos -> subject; clips -> motion, preservation for subject)
    cache: Path | None = None  # a dataset cache file (Save Dataset Cache's) in place of a folder
    caption: str = ""  # for items without a sidecar caption (same stem, .txt)
    trigger_words: str = ""  # the subject's words in the captions (token attention, trigger embedding; SynMotion's
    # subject embedding, where captions name different subjects each one's, comma-separated: "a dog, a cat")
    motion_words: str = ""  # SynMotion's motion clips: the motion's words in every caption (its motion embedding)
    mask_folder: str = "masks"  # masks in this sub-folder under the photo's name...
    mask_suffix: str = "_mask"  # ...or beside the photo as <stem><suffix>.<image suffix>
    frames: int | None = None  # clips: the first N frames of each (None: all; all clips the same length)
    stills: int | None = None  # clips: single frames of each also encoded as images; None: 8 where used (the
    # motion recipe's spatial phase, a stillness LoRA's preservation clips), else none
    hue_copies: int = 0
    moving_clips: int = 0  # photos: per photo, clips of the subject sliding over its background (needs masks)
    moving_frames: int = 17
    buckets: bool = False  # fit items of mixed sizes and lengths to size buckets (off: one size per dataset)
    bucket_width: int = 832  # the buckets' pixel budget: at most bucket_width x bucket_height pixels
    bucket_height: int = 480

    @property
    def name(self) -> str:
        return (self.path or self.cache).name


@dataclass
class OutputConfig:
    folder: Path
    name: str
    checkpoint_every: int = 100
    checkpoints: Path | None = None  # default: <folder>/checkpoints/<name>

    @property
    def checkpoint_folder(self) -> Path:
        return self.checkpoints or self.folder / "checkpoints" / self.name


@dataclass
class TrainConfig:
    source: Path
    model: ModelConfig
    datasets: list[DatasetConfig]
    recipe: str
    settings: Any  # RECIPES[recipe]
    output: OutputConfig
    strategy: str = "ddp"  # [distributed] strategy

    @property
    def optim(self) -> OptimSettings:
        return self.settings.optim

    def as_dict(self) -> dict:
        """The resolved config (paths absolute, every setting with its value), as `--dry-run` prints it."""
        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return str(x) if isinstance(x, Path) else x

        return {"model": plain(self.model), "datasets": plain(self.datasets),
                "recipe": {"type": self.recipe, **plain(self.settings)}, "output": plain(self.output),
                "distributed": {"strategy": self.strategy}}


# --- reading --------------------------------------------------------------------------------------------------
TOML_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)",
              list: "a list", dict: "a table"}


def _type_name(hint) -> str:
    """What a settings field takes, as a TOML value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(args[0])} each" if args[-1] is Ellipsis else \
            f"a list of {len(args)}: {', '.join(_type_name(a) for a in args)}"
    return "a table" if dataclasses.is_dataclass(hint) else TOML_TYPES.get(hint, str(hint))


_NOT_CONVERTED = object()


def _converted(hint, value, key: str):
    """A TOML value as the field's type (lists as tuples, integers as floats where a float is wanted), or refused
    naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = _NOT_CONVERTED
    if origin in (typing.Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _converted(option, value, key)
            except InputError:
                continue
    elif origin is tuple and isinstance(value, list):
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_converted(h, v, f"{key}[{i}]") for i, (h, v) in enumerate(zip(items, value)))
    elif hint is bool:
        ok = value if isinstance(value, bool) else _NOT_CONVERTED
    elif hint is int:
        ok = value if isinstance(value, int) and not isinstance(value, bool) else _NOT_CONVERTED
    elif hint is float:
        ok = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NOT_CONVERTED
    elif hint in (str, Path):
        ok = hint(value) if isinstance(value, str) else _NOT_CONVERTED
    if ok is not _NOT_CONVERTED:
        return ok
    raise InputError(key, f"{value!r} is {TOML_TYPES.get(type(value), type(value).__name__)}", _type_name(hint))


def _filled(default, table: Any, where: str):
    """`default` (a settings dataclass) with the table's keys set; nested settings from sub-tables. `where`: the
    table as the config names it (`[recipe]`), for messages."""
    if not isinstance(table, dict):
        raise InputError(where, f"{table!r} is not a table", "a table of settings")
    hints = typing.get_type_hints(type(default))
    valid = [f.name for f in dataclasses.fields(default)]
    for key in table:
        if key not in valid:
            raise InputError(where, f"unknown key '{key}'", "valid: " + ", ".join(valid))
    changes = {}
    for key, value in table.items():
        hint = hints[key]
        nested = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if nested is not None:
            inner = getattr(default, key)
            changes[key] = _filled(inner if inner is not None else nested(), value, f"{where[:-1]}.{key}]")
        else:
            changes[key] = _converted(hint, value, f"{where} {key}")
    return dataclasses.replace(default, **changes)


def _path(base: Path, value: Any, key: str, must_exist: bool = True) -> Path:
    path = (base / _converted(Path, value, key)).resolve()
    if must_exist and not path.exists():
        raise InputError(key, f"'{path}' does not exist", "the path of an existing file or folder (relative paths "
                                                          "start at the config file's folder)")
    return path


def _section(raw: dict, name: str, where: str, required: tuple[str, ...], valid: list[str]) -> dict:
    table = raw.get(name)
    if not isinstance(table, dict):
        raise InputError(where, "is missing" if table is None else f"{table!r} is not a table", "a table of settings")
    for key in table:
        if key not in valid:
            raise InputError(where, f"unknown key '{key}'", "valid: " + ", ".join(valid))
    for key in required:
        if key not in table:
            raise InputError(where, f"key '{key}' is missing", f"{key} = ... in {where}")
    return table


def _one_of(value: Any, options: tuple[str, ...], key: str) -> str:
    value = _converted(str, value, key)
    if value not in options:
        raise InputError(key, f"'{value}'", "one of " + ", ".join(options))
    return value


def _model(raw: dict, base: Path) -> ModelConfig:
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    table = _section(raw, "model", "[model]", ("path",), valid)
    paths = {k: _path(base, table[k], f"[model] {k}") for k in ("path", "vae", "text_encoder", "tokenizer", "raft", "dino")
             if k in table}
    model = dataclasses.replace(ModelConfig(paths.pop("path")), **paths)
    model = _filled(model, {k: v for k, v in table.items() if k not in ("path", *paths)}, "[model]")
    _one_of(model.dtype, DTYPES, "[model] dtype")
    _one_of(model.training_dtype, DTYPES, "[model] training_dtype")
    if model.text_tokens < 1:
        raise InputError("[model] text_tokens", f"{model.text_tokens}", "at least 1 (Wan: 512)")
    return model


def _datasets(raw: dict, base: Path, recipe: str) -> list[DatasetConfig]:
    tables = raw.get("datasets")
    if not isinstance(tables, list) or not tables:
        raise InputError("[[datasets]]", "is missing" if tables is None else "is not a list of tables",
                         "one or more [[datasets]] tables, each with a path")
    valid = [f.name for f in dataclasses.fields(DatasetConfig)]
    found = []
    for i, table in enumerate(tables):
        where = f"[[datasets]] #{i + 1}"
        if not isinstance(table, dict):
            raise InputError(where, f"{table!r} is not a table", "a table with a path")
        for key in table:
            if key not in valid:
                raise InputError(where, f"unknown key '{key}'", "valid: " + ", ".join(valid))
        if ("path" in table) == ("cache" in table):
            raise InputError(where, "both 'path' and 'cache'" if "path" in table else "key 'path' is missing",
                             "path = \"a folder of photos or clips\", or cache = \"a dataset cache file\"")
        path = cache = None
        if "path" in table:
            path = _path(base, table["path"], f"{where} path")
            if not path.is_dir():
                raise InputError(f"{where} path", f"'{path}' is not a folder", "a folder of photos or of clips")
            kind = _one_of(table.get("kind", "photos"), DATASET_KINDS, f"{where} kind")
        else:
            cache = _path(base, table["cache"], f"{where} cache")
            kind = _cache_kind(cache, f"{where} cache")
            if "kind" in table and table["kind"] != kind:
                raise InputError(f"{where} kind", f"'{table['kind']}' for a cache of {kind}", f"'{kind}', or no kind")
        default_use = "subject" if kind == "photos" else ("preservation" if recipe == "subject" else "motion")
        use = _one_of(table.get("use", default_use), DATASET_USES, f"{where} use")
        if kind == "photos" and use != "subject":
            raise InputError(f"{where} use", f"'{use}' for photos", "'subject' (photos are a subject's)")
        if kind == "clips" and use == "subject":
            raise InputError(f"{where} use", "'subject' for clips", "'motion' or 'preservation'")
        rest = {k: v for k, v in table.items() if k not in ("path", "cache", "kind", "use")}
        data = _filled(DatasetConfig(path, kind, use, cache), rest, where)
        for key, low in (("frames", 1), ("stills", 0), ("hue_copies", 0), ("moving_clips", 0), ("moving_frames", 2)):
            value = getattr(data, key)
            if value is not None and value < low:
                raise InputError(f"{where} {key}", f"{value}", f"{low} or more")
        found.append(data)
    needed, optional = RECIPE_USES[recipe]
    uses = {d.use for d in found}
    if needed - uses:
        raise InputError("[[datasets]]", f"no dataset to use as {' and '.join(sorted(needed - uses))}",
                         f"the {recipe} recipe's data: " + ", ".join(sorted(needed)) + " (" + ", ".join(
                             f"use = \"{u}\"" for u in sorted(needed)) + ")")
    if uses - needed - optional:
        raise InputError("[[datasets]]", f"datasets used as {', '.join(sorted(uses - needed - optional))}",
                         f"what the {recipe} recipe learns from: " + ", ".join(sorted(needed | optional)))
    if recipe == "synmotion":
        _check_synmotion_data(found)
    elif any(d.motion_words for d in found):
        raise InputError("[[datasets]] motion_words", f"given for the {recipe} recipe",
                         "motion_words only with type = \"synmotion\" (SynMotion's motion embedding)")
    return found


def _check_synmotion_data(found: list[DatasetConfig]) -> None:
    """SynMotion finds each clip's subject and motion words (the prior clips': their subject's) in its caption: its
    datasets are folders of captioned clips, the motion clips' naming both kinds of words."""
    for data in found:
        where = f"[[datasets]] {data.name}"
        if data.motion_words and data.use != "motion":
            raise InputError(f"{where} motion_words", f"given for {data.use} clips",
                             "motion_words in the motion clips' dataset only (prior clips' captions name their subject as "
                             "\"<subject> | <action>\")")
        if data.cache is not None:
            raise InputError(f"{where} cache", "a dataset cache for SynMotion (it keeps no captions)",
                             "path = \"a folder of clips with captions\"")
        for key in ("trigger_words", "motion_words") if data.use == "motion" else ():
            if not getattr(data, key).strip():
                raise InputError(f"{where} {key}", "is missing", (
                    "the subject's words in the captions, e.g. trigger_words = \"a dog\" (several, comma-separated: "
                    "\"a dog, a cat\")" if key == "trigger_words" else
                    "the motion's words in every caption, e.g. motion_words = \"moving left\""))


def _cache_kind(path: Path, key: str) -> str:
    """"photos" or "clips": what a dataset cache holds, read from its metadata alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("layout", "null"))
    except Exception:  # safetensors raises its own error types for files it cannot read
        layout = None
    if not isinstance(layout, dict):
        raise InputError(key, f"'{path.name}' is not a CustVid dataset cache", "a file written by Save Dataset Cache")
    first = layout["sets"][0] if layout.get("kind") == "buckets" else layout
    return "clips" if first.get("kind") == "clips" else "photos"


def _recipe(raw: dict, steps: int | None) -> tuple[str, Any]:
    table = raw.get("recipe")
    if not isinstance(table, dict):
        raise InputError("[recipe]", "is missing" if table is None else "is not a table",
                         "a [recipe] table with type = " + " | ".join(f'"{r}"' for r in RECIPES))
    if "type" not in table:
        raise InputError("[recipe]", "key 'type' is missing", "type = " + " | ".join(f'"{r}"' for r in RECIPES))
    recipe = _one_of(table["type"], tuple(RECIPES), "[recipe] type")
    default = RECIPES[recipe]()
    given = {k: v for k, v in table.items() if k != "type"}
    optim_given = given.get("optim") if isinstance(given.get("optim"), dict) else {}
    if "checkpoint_every" in optim_given:
        raise InputError("[recipe.optim]", "unknown key 'checkpoint_every'", "checkpoint_every in [output]")
    if "preview_every" in optim_given:  # previews sample through ComfyUI's sampler: the train nodes take them
        raise InputError("[recipe.optim]", "unknown key 'preview_every'",
                         "no previews in the train command (the train nodes' preview_every takes them)")
    for part in ("subject", "motion") if recipe == "joint" else ():
        if isinstance(given.get(part), dict) and "optim" in given[part]:
            raise InputError(f"[recipe.{part}]", "unknown key 'optim'", "the joint run's one optimiser in [recipe.optim]")
    settings = _filled(default, given, "[recipe]")
    optim = settings.optim if steps is None else dataclasses.replace(settings.optim, steps=steps)
    if "warmup" not in optim_given:
        optim = dataclasses.replace(optim, warmup=min(default.optim.warmup, optim.steps // WARMUP_SHARE[recipe]))
    return recipe, dataclasses.replace(settings, optim=optim)


def _synmotion_prior(settings: SynMotionSettings, table: dict, datasets: list[DatasetConfig]) -> SynMotionSettings:
    """SynMotion's prior steps: on with prior clips, off without them (as Train SynMotion's prior_clips input); a
    `prior` setting that contradicts the datasets is refused."""
    given = any(d.use == "prior" for d in datasets)
    if "prior" in table and settings.prior != given:
        raise InputError("[recipe] prior", f"{str(settings.prior).lower()} with " + ("prior clips" if given else "none"),
                         "prior = true with a [[datasets]] table of use = \"prior\" clips, or false without one")
    return dataclasses.replace(settings, prior=given)


def _output(raw: dict, base: Path, recipe: str) -> OutputConfig:
    """[output]; its name defaults to the recipe's."""
    valid = [f.name for f in dataclasses.fields(OutputConfig)]
    table = _section(raw, "output", "[output]", ("folder",), valid)
    name = _converted(str, table.get("name", recipe), "[output] name")
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError("[output] name", f"'{name}'", "a file name without folders, e.g. \"my_dog\"")
    every = _converted(int, table.get("checkpoint_every", 100), "[output] checkpoint_every")
    if every < 1:
        raise InputError("[output] checkpoint_every", f"{every}", "at least 1 step")
    checkpoints = _path(base, table["checkpoints"], "[output] checkpoints", must_exist=False) \
        if "checkpoints" in table else None
    return OutputConfig(_path(base, table["folder"], "[output] folder", must_exist=False), name, every, checkpoints)


def load_config(path: str | Path, steps: int | None = None) -> TrainConfig:
    """Read and check a training config (see the module's docstring); `steps` replaces the recipe's step count."""
    source = Path(path).resolve()
    if not source.is_file():
        raise InputError("CONFIG", f"'{source}' does not exist", "the path of a .toml training config")
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError("CONFIG", f"'{source.name}' is not valid TOML ({e})", "a TOML file") from None
    for key in raw:
        if key not in SECTIONS:
            raise InputError("CONFIG", f"unknown section '{key}'",
                             "sections: [model], [[datasets]], [recipe], [output], [distributed]")
    if steps is not None and steps < 1:
        raise InputError("--steps", f"{steps}", "at least 1 step")
    base = source.parent
    model = _model(raw, base)
    recipe, settings = _recipe(raw, steps)
    datasets, output = _datasets(raw, base, recipe), _output(raw, base, recipe)
    settings = dataclasses.replace(settings, optim=dataclasses.replace(settings.optim,
                                                                       checkpoint_every=output.checkpoint_every))
    if recipe == "synmotion":
        settings = _synmotion_prior(settings, raw["recipe"], datasets)
    strategy = _one_of(_section(raw, "distributed", "[distributed]", (), ["strategy"]).get("strategy", "ddp"),
                       STRATEGIES, "[distributed] strategy") if "distributed" in raw else "ddp"
    return TrainConfig(source, model, datasets, recipe, settings, output, strategy)


# --- the items of a dataset folder ------------------------------------------------------------------------------
@dataclass
class Item:
    """One photo or clip of a dataset folder, with its mask (photos) and caption."""

    path: Path
    caption: str
    mask: Path | None = None


def _caption(item: Path, data: DatasetConfig) -> str:
    sidecar = item.with_suffix(".txt") if item.is_file() else item.with_name(item.name + ".txt")
    text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else data.caption.strip()
    if not text:
        raise InputError("[[datasets]] caption", f"'{item.name}' has no caption ({sidecar.name} is missing and the "
                         "dataset has no caption)", f"a sidecar {sidecar.name}, or caption = \"...\" in the dataset")
    return " ".join(text.split())


def _mask_for(photo: Path, data: DatasetConfig) -> Path | None:
    from ..eval.files import IMAGE_SUFFIXES

    folder = data.path / data.mask_folder
    candidates = [folder / (photo.stem + s) for s in IMAGE_SUFFIXES] if data.mask_folder and folder.is_dir() else []
    candidates += [photo.with_name(photo.stem + data.mask_suffix + s) for s in IMAGE_SUFFIXES] if data.mask_suffix else []
    return next((c for c in candidates if c.is_file()), None)


def dataset_items(data: DatasetConfig) -> list[Item]:
    """The photos (with their masks: in `mask_folder` under the photo's name, or beside it with `mask_suffix`) or
    the clips (video files, and sub-folders of frame images) of a dataset folder, in name order, with captions."""
    from ..eval.files import IMAGE_SUFFIXES

    if data.path is None:
        return []
    entries = sorted(data.path.iterdir())
    if data.kind == "photos":
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                 and not (data.mask_suffix and p.stem.endswith(data.mask_suffix))]
        items = [Item(p, _caption(p, data), _mask_for(p, data)) for p in files]
        with_mask = [i for i in items if i.mask is not None]
        if with_mask and len(with_mask) != len(items):
            missing = next(i.path.name for i in items if i.mask is None)
            raise InputError("[[datasets]] masks", f"'{missing}' in '{data.path}' has no mask and other photos have",
                             f"a mask for every photo (in {data.mask_folder}/ under the photo's name, or "
                             f"<name>{data.mask_suffix}.png beside it), or for none")
    else:
        items = [Item(p, _caption(p, data)) for p in entries
                 if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or
                 (p.is_dir() and p.name != data.mask_folder and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))]
    if not items:
        what = "image files" if data.kind == "photos" else "video files or folders of frame images"
        raise InputError("[[datasets]] path", f"'{data.path}' holds no {data.kind}", f"a folder of {what}")
    return items


# --- the base model, VAE and text encoder (host-free) -------------------------------------------------------------
def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """A config's dtype name as a torch dtype; "auto": the compute dtype this device trains in by default."""
    return compute_dtype(device) if name == "auto" else TRAINING_DTYPES[name]


def _device(name: str) -> torch.device:
    if name == "auto":
        return process_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError("[model] device", f"'{name}'", "auto, cpu, cuda or cuda:N") from None


def _pipeline_part(model: ModelConfig, part: str) -> Path | None:
    """A diffusers pipeline folder's sub-folder (`vae`, `text_encoder`, `tokenizer`), if the model is one."""
    folder = model.path / part
    return folder if model.path.is_dir() and (model.path / "transformer").is_dir() and folder.is_dir() else None


def comfy_wan_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """diffusers' `WanTransformer3DModel` arguments for a ComfyUI-layout Wan 2.x text-to-video state dict, read off
    its weights' shapes as ComfyUI's model detection reads them (128-wide attention heads)."""
    dim = state_dict["head.modulation"].shape[-1]
    patch = tuple(state_dict["patch_embedding.weight"].shape[2:])
    return dict(patch_size=patch, num_attention_heads=dim // 128, attention_head_dim=128,
                in_channels=state_dict["patch_embedding.weight"].shape[1],
                out_channels=state_dict["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
                text_dim=state_dict["text_embedding.0.weight"].shape[1],
                freq_dim=state_dict["time_embedding.0.weight"].shape[1],
                ffn_dim=state_dict["blocks.0.ffn.0.weight"].shape[0],
                num_layers=1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")),
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def load_wan_transformer(path: Path, dtype: torch.dtype, key: str = "[model] path") -> torch.nn.Module:
    """diffusers' `WanTransformer3DModel` from a ComfyUI single file (its native keys mapped by the pack's own key
    conversion, `backbones.wan.diffusers_to_native_key`), a diffusers transformer folder, or a diffusers pipeline
    folder (its transformer/)."""
    from diffusers import WanTransformer3DModel

    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if not (folder / "config.json").is_file():
            raise InputError(key, f"'{path}' is neither a diffusers Wan transformer folder nor a pipeline folder",
                             "a ComfyUI Wan checkpoint (.safetensors), or a diffusers folder with config.json")
        try:
            return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()
        except (OSError, ValueError, TypeError) as e:
            raise InputError(key, f"'{folder}' could not be loaded as a WanTransformer3DModel ({e})",
                             "a diffusers Wan transformer folder") from None
    from diffusers.utils import is_accelerate_available

    from ..backbones.wan import diffusers_to_native_key
    from ..files import load_state_dict

    state = load_state_dict(path, key)
    prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.") if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "head.modulation" not in state or "patch_embedding.weight" not in state:
        raise InputError(key, f"'{path.name}' is not a Wan diffusion model (no head.modulation weight)",
                         "a ComfyUI Wan 2.x checkpoint from models/diffusion_models")
    config = comfy_wan_config(state)
    if config["num_attention_heads"] * 128 != state["head.modulation"].shape[-1]:
        raise InputError(key, f"width {state['head.modulation'].shape[-1]}", "a Wan model with 128-wide attention heads")
    # Without accelerate the model is built with random weights first, which the file's then replace.
    if is_accelerate_available():
        from accelerate import init_empty_weights
    with init_empty_weights() if is_accelerate_available() else contextlib.nullcontext():
        model = WanTransformer3DModel(**config)
    names = {diffusers_to_native_key(k): k for k in model.state_dict()}
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unknown or missing:
        raise InputError(key, f"'{path.name}' is not a Wan text-to-video model of the layout its weights suggest ("
                         + (f"weights of another model type: {', '.join(unknown[:3])}" if unknown else
                            f"missing {', '.join(missing[:3])}") + ")",
                         "a Wan 2.x text-to-video checkpoint (image-to-video, VACE and others are not trained from a "
                         "config)")
    try:
        model.load_state_dict({names[k]: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:  # shapes that do not fit the layout, or a quantized file's scales
        raise InputError(key, f"'{path.name}' does not load as a Wan text-to-video model ({str(e)[:300]})",
                         "an unquantized Wan 2.x checkpoint (fp32, bf16 or fp16)") from None
    return model.eval()


def _vae_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Callable, Any]:
    """diffusers' `AutoencoderKLWan`'s encode as the datasets' builders call it (pixels `[N, F, H, W, 3]` in [0, 1]
    -> the latents' means, as ComfyUI's VAE Encode gives them; `latent_stats` normalises them for the model), and
    its config."""
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    except (OSError, ValueError, TypeError) as e:
        raise InputError("[model] vae", f"'{folder}' could not be loaded as a diffusers AutoencoderKLWan ({e})",
                         "a diffusers-layout Wan VAE folder (config.json + weights); or " + NOT_HOST_FREE) from None

    @torch.no_grad()
    def encode(clips: torch.Tensor) -> torch.Tensor:
        pixels = clips[..., :3].permute(0, 4, 1, 2, 3) * 2 - 1  # [N, 3, F, H, W] in [-1, 1]
        return vae.encode(pixels.to(device, dtype)).latent_dist.mode().float().cpu()

    return encode, vae.config


def latent_stats(model: ModelConfig, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent mean and std that put a Wan VAE's latents into the model's latent format (`(z - mean) / std`, as
    Wan's pipelines and ComfyUI's Wan latent formats do): the VAE folder's, or Wan 2.1's for 16-channel latents."""
    from diffusers import AutoencoderKLWan

    folder = model.vae or _pipeline_part(model, "vae")
    config = AutoencoderKLWan.load_config(folder) if folder is not None else {}
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters  # Wan 2.1's VAE's
    mean = config.get("latents_mean") or defaults["latents_mean"].default
    std = config.get("latents_std") or defaults["latents_std"].default
    if len(mean) != channels:
        raise InputError("[model] vae", f"latents of {channels} channels and no VAE folder giving their mean and std",
                         "the diffusers folder of the VAE that encoded them (its config.json is enough)")
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


@dataclass
class TextEncoder:
    """A UMT5 text encoder and its tokenizer, encoding prompts as Wan's pipelines do: the prompt's tokens' last
    hidden states, zeros after them up to `tokens`."""

    model: Any
    tokenizer: Any
    device: torch.device
    tokens: int

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.tokens, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = batch.attention_mask.to(self.device)
        hidden = self.model(batch.input_ids.to(self.device), mask).last_hidden_state
        return (hidden * mask[..., None]).float().cpu()

    def positions(self, prompt: str, words: str, key: str) -> tuple[int, ...]:
        """Where `words` sit among the prompt's context rows."""
        from ..control.boxes import word_positions

        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        return word_positions(ids, {w: self.tokenizer(w, add_special_tokens=False).input_ids for w in words.split()},
                              key, prompt)


def _text_encoder(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = model.text_encoder or _pipeline_part(model, "text_encoder")
    tokenizer = model.tokenizer or _pipeline_part(model, "tokenizer") or folder
    if folder is None:
        raise InputError("[model] text_encoder", "not given, and the model is not a diffusers pipeline folder",
                         "the folder of a transformers UMT5 encoder; or " + NOT_HOST_FREE)
    try:
        encoder = UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    except (OSError, ValueError, TypeError) as e:
        raise InputError("[model] text_encoder", f"'{folder}' could not be loaded as a transformers UMT5 encoder ({e})",
                         "a transformers-layout UMT5 folder (config.json + weights); or " + NOT_HOST_FREE) from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError, TypeError) as e:
        raise InputError("[model] tokenizer", f"'{tokenizer}' holds no tokenizer ({e})",
                         "the text encoder's tokenizer folder (tokenizer.json or spiece.model)") from None
    return TextEncoder(encoder, tok, device, model.text_tokens)


def _vae_folder(model: ModelConfig) -> Path:
    folder = model.vae or _pipeline_part(model, "vae")
    if folder is None:
        raise InputError("[model] vae", "not given, and the model is not a diffusers pipeline folder",
                         "the folder of a diffusers AutoencoderKLWan; or " + NOT_HOST_FREE)
    return folder


# --- the datasets, encoded ----------------------------------------------------------------------------------------
def _same_size(items: list[torch.Tensor], data: DatasetConfig, what: str) -> None:
    sizes = sorted({tuple(t.shape[:-1]) for t in items})
    if len(sizes) > 1 and not data.buckets:
        raise InputError(f"[[datasets]] {data.name}", f"{what} of different sizes {sizes}",
                         f"{what} of one size (and, for clips, one frame count: set frames = N) in a dataset, or "
                         "buckets = true")


def _bucket_rule(data: DatasetConfig, vae_config) -> Any:
    """The dataset's size buckets for this VAE: sides on its stride times Wan's 2x2 patch, whole latent frames."""
    from .buckets import BucketRule

    if not data.buckets:
        return None
    stride = 2 ** (len(vae_config.dim_mult) - 1) * (vae_config.get("patch_size") or 1)
    return BucketRule(data.bucket_width, data.bucket_height, grid=stride * 2,
                      frame_step=2 ** sum(vae_config.temperal_downsample))


def _read_clips(data: DatasetConfig, items: list[Item], frame_step: int) -> list[torch.Tensor]:
    from ..eval.files import read_clip

    clips = [read_clip(i.path, f"[[datasets]] {data.name}", data.frames) for i in items]
    short = [i.path.name for i, c in zip(items, clips) if data.frames is not None and c.shape[0] < data.frames]
    if short:
        raise InputError(f"[[datasets]] {data.name} frames", f"{short[0]} has fewer than {data.frames} frames",
                         "a frame count every clip has")
    _same_size(clips, data, "clips")
    count = clips[0].shape[0]
    if not data.buckets and (count % frame_step != 1 % frame_step or count < 2):  # buckets trim clips themselves
        raise InputError(f"[[datasets]] {data.name} frames", f"clips of {count} frames",
                         f"a count the VAE encodes whole: 1 + {frame_step}k frames (e.g. 17, 33, 81); set frames = N")
    return clips


def _captions_context(items: list[Item], text: TextEncoder, each: bool = False) -> torch.Tensor:
    """One conditioning row per item, or (unless `each`) one for all where every caption is the same."""
    captions = [i.caption for i in items]
    return text(captions[:1]) if len(set(captions)) == 1 and not each else text(captions)


@dataclass
class Encoders:
    """What encodes a dataset folder: the VAE's encode and config, the text encoder, and optionally RAFT (the motion
    clips' flow) and DINOv2 (the photos' features) with the resolution it sees."""

    encode: Callable
    vae_config: Any
    text: TextEncoder
    raft: Any = None
    dino: Any = None
    dino_resolution: int = 448

    @property
    def frame_step(self) -> int:
        return 2 ** sum(self.vae_config.temperal_downsample)


def _encoders(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> Encoders:
    from ..representations.motion import load_raft
    from ..representations.subject import load_dinov2

    encode, vae_config = _vae_encoder(_vae_folder(model), device, dtype)
    raft = load_raft(model.raft, "[model] raft") if model.raft else None
    dino = load_dinov2(model.dino, "[model] dino") if model.dino else None
    for encoder in (raft, dino):
        if encoder is not None:
            encoder.model.to(device)
    return Encoders(encode, vae_config, _text_encoder(model, device, dtype), raft, dino, model.dino_resolution)


def _photo_set(data: DatasetConfig, encoders: Encoders, preservation):
    from ..eval.files import read_image
    from ..representations.subject import extract_subject
    from .datasets import subject_set

    items = dataset_items(data)
    photos = [read_image(i.path, f"[[datasets]] {data.name}")[0] for i in items]
    _same_size(photos, data, "photos")
    masks = [read_image(i.mask, f"[[datasets]] {data.name} masks")[0].mean(-1) for i in items] \
        if items[0].mask is not None else None
    tokens = None
    words = " ".join(data.trigger_words.split())
    text = encoders.text
    if words:
        found = {text.positions(i.caption, words, f"[[datasets]] {data.name} trigger_words") for i in items}
        if len(found) > 1:
            raise InputError(f"[[datasets]] {data.name} trigger_words", "they sit at other places in different "
                             "captions", "captions that put the trigger words at the same place (e.g. all 'a sks dog "
                             "...')")
        tokens = found.pop()
    features = None if encoders.dino is None else \
        extract_subject(encoders.dino, photos, masks, resolution=encoders.dino_resolution)
    return subject_set(photos, encoders.encode, _captions_context(items, text), masks, features, preservation, tokens,
                       words, data.moving_clips, data.moving_frames, frame_step=encoders.frame_step,
                       buckets=_bucket_rule(data, encoders.vae_config))


def _stills(config: TrainConfig, data: DatasetConfig) -> int:
    """How many single frames of each clip are encoded: the dataset's `stills`, else 8 where the recipe learns
    from them."""
    if data.stills is not None:
        return data.stills
    subject = config.settings.subject if config.recipe == "joint" else config.settings
    return 8 if data.use == "motion" or getattr(subject, "stillness_rank", 0) > 0 else 0


def _clip_set(data: DatasetConfig, encoders: Encoders, stills: int, items: list[Item] | None = None,
              each_caption: bool = False):
    """The dataset's clips encoded (`items`: its items with the captions to encode, default the folder's);
    `each_caption`: one conditioning row per clip even where the captions are the same."""
    from ..representations.motion import extract_motion
    from .datasets import clip_set

    items = items or dataset_items(data)
    clips = _read_clips(data, items, encoders.frame_step)
    flow = [extract_motion(encoders.raft, c).flow for c in clips] \
        if encoders.raft is not None and data.use == "motion" else None
    return clip_set(clips, encoders.encode, _captions_context(items, encoders.text, each_caption), flow, stills=stills,
                    hue_copies=data.hue_copies, buckets=_bucket_rule(data, encoders.vae_config))


def _cached(data: DatasetConfig, preservation=None):
    """A dataset cache's set (a subject's with `preservation` clips where it has none of its own)."""
    from dataclasses import replace

    from .dataset_cache import load_dataset
    from .datasets import Bucketed, buckets_of

    loaded = load_dataset(data.cache, input_name=f"[[datasets]] {data.name}")
    if data.kind == "clips" or preservation is None or buckets_of(loaded)[0].preservation is not None:
        return loaded
    if isinstance(loaded, Bucketed):
        return Bucketed(tuple(replace(s, preservation=preservation) for s in loaded.sets), loaded.labels)
    return replace(loaded, preservation=preservation)


@dataclass
class SynMotionWords:
    """What SynMotion finds in the captions: each motion clip's subject and motion word positions (a clip's hue copies
    included), the motion words' own conditioning, the words, and the prior clips' prompts with their subject words'
    positions."""

    positions: list  # adapters.synmotion.RolePositions, one per motion clip
    motion_phrase: torch.Tensor
    subject_words: str
    motion_words: str
    prior_prompts: list  # prior_clips.PriorPrompt, one per prior clip
    prior_subjects: list | None  # their subject words' positions; None without prior clips


def _subject_in(caption: str, words: str, key: str) -> str:
    """The caption's subject words: of the comma-separated entries of `words`, the first in the caption."""
    padded = f" {caption} "
    found = sorted((e for e in (" ".join(w.split()) for w in words.split(",")) if e and f" {e} " in padded),
                   key=padded.index)
    if not found:
        raise InputError(key, f"none of '{words}' is in the caption '{caption}'",
                         "the subject's words of every caption, several separated by commas (e.g. \"a dog, a cat\")")
    return found[0]


def _synmotion_sets(config: TrainConfig, encoders: Encoders) -> tuple[dict[str, Any], SynMotionWords]:
    """SynMotion's motion clips and prior clips, each clip with its own caption's conditioning, and the words found in
    the captions by the text encoder's tokenizer (as Train SynMotion finds them). A prior clip's caption is
    "<subject> | <action>", as Subject Prior Clips' prompts."""
    from ..adapters.synmotion import RolePositions
    from .datasets import append_clips
    from .prior_clips import parse_prior_prompts

    text = encoders.text
    motion = {" ".join(d.motion_words.split()) for d in config.datasets if d.use == "motion"}
    if len(motion) > 1:
        raise InputError("[[datasets]] motion_words", f"different motion words {sorted(motion)} in the motion datasets",
                         "the same motion words for every motion clip (SynMotion learns one motion)")
    motion_words = motion.pop()
    sets: dict[str, Any] = {}
    positions, subjects, prompts = [], [], []
    for data in config.datasets:
        where = f"[[datasets]] {data.name}"
        items = dataset_items(data)
        if data.use == "prior":
            found = [parse_prior_prompts(i.caption, f"{where} caption of {i.path.name}")[0] for i in items]
            prompts += [p for p in found for _ in range(1 + data.hue_copies)]
            items = [dataclasses.replace(i, caption=p.text) for i, p in zip(items, found)]
        else:
            for item in items:
                subject = _subject_in(item.caption, data.trigger_words, f"{where} trigger_words")
                subjects.append(subject)
                positions += [RolePositions(text.positions(item.caption, subject, f"{where} trigger_words"),
                                            text.positions(item.caption, motion_words, f"{where} motion_words"))
                              ] * (1 + data.hue_copies)
        new = _clip_set(data, encoders, 0, items, each_caption=True)
        if new.context.shape[0] == 1:  # one clip and its hue copies: SynMotion takes each clip's own row
            new = dataclasses.replace(new, context=new.context.repeat(new.latents.shape[0], 1, 1))
        sets[data.use] = append_clips(sets[data.use], new) if data.use in sets else new
    prior_subjects = [text.positions(p.text, p.subject, "[[datasets]] prior caption") for p in prompts] if prompts \
        else None
    words = SynMotionWords(positions, text([motion_words]), ", ".join(dict.fromkeys(subjects)), motion_words, prompts,
                           prior_subjects)
    return {"motion": sets["motion"], **({"prior": sets["prior"]} if "prior" in sets else {})}, words


def build_datasets(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The config's datasets, encoded by its VAE and text encoder (folders) or read (caches), joined by use and put
    in the model's latent format: {"subject": SubjectSet (with the preservation clips), "motion": VideoSet} (or
    `Bucketed` sets of them); SynMotion's: {"motion": VideoSet, "prior": PriorClips, "synmotion": SynMotionWords}.
    The encoders are let go before training."""
    from .datasets import buckets_of, converted

    encoders = _encoders(config.model, device, dtype) if any(d.path is not None for d in config.datasets) else None
    sets, words = _synmotion_sets(config, encoders) if config.recipe == "synmotion" else (_recipe_sets(config, encoders),
                                                                                          None)
    del encoders
    gc.collect()
    mean, std = latent_stats(config.model, buckets_of(next(iter(sets.values())))[0].latents.shape[1])
    data = {k: converted(v, lambda z: (z - mean) / std) for k, v in sets.items()}
    if words is not None:
        from .prior_clips import PriorClips

        if "prior" in data:  # clips from a folder are taken as this model's own (Subject Prior Clips made with it)
            prior = data["prior"]
            data["prior"] = PriorClips(prior.latents, prior.context, prior.flow, prior.stills,
                                       prompts=tuple(words.prior_prompts), base_model=_prior_fingerprint(config))
        data["synmotion"] = words
    return data


def _prior_fingerprint(config: TrainConfig) -> str:
    return f"config model {config.model.path}"


def _recipe_sets(config: TrainConfig, encoders: Encoders | None) -> dict[str, Any]:
    """The other recipes' datasets, joined by use."""
    from .datasets import append_clips, append_photos

    bucketed = {use: any(d.buckets or d.cache for d in config.datasets if d.use == use) for use in DATASET_USES}
    clips: dict[str, Any] = {}
    for data in (d for d in config.datasets if d.kind == "clips"):
        new = _cached(data) if data.cache else _clip_set(data, encoders, _stills(config, data))
        clips[data.use] = append_clips(clips[data.use], new, bucketed[data.use]) if data.use in clips else new
    subject = None
    for data in (d for d in config.datasets if d.kind == "photos"):
        preservation = clips.get("preservation")
        new = _cached(data, preservation) if data.cache else _photo_set(data, encoders, preservation)
        subject = new if subject is None else append_photos(subject, new, bucketed["subject"])
    return {k: v for k, v in (("subject", subject), ("motion", clips.get("motion"))) if v is not None}


# --- training and its files -------------------------------------------------------------------------------------
def output_files(config: TrainConfig) -> dict[str, Path]:
    """What a run writes, by what it is: the recipe's files (as the pack's save nodes write them), the loss history
    and its plot."""
    out, name, s = config.output.folder, config.output.name, config.settings
    files = {"lora": out / f"{name}.safetensors"} if config.recipe in ("subject", "motion") else {}
    if config.recipe == "subject" and s.trigger_embedding:
        files["trigger_embedding"] = out / f"{name}_trigger_embedding.safetensors"
    if config.recipe == "joint":
        files |= {"subject_lora": out / f"{name}_subject.safetensors", "motion_lora": out / f"{name}_motion.safetensors",
                  "dualreal": out / f"{name}_dualreal.safetensors"}
        if s.subject.trigger_embedding:
            files["trigger_embedding"] = out / f"{name}_trigger_embedding.safetensors"
    if config.recipe == "dualreal":
        files["dualreal"] = out / f"{name}.safetensors"
    if config.recipe == "synmotion":
        files |= {"lora": out / f"{name}.safetensors", "synmotion": out / f"{name}_embeddings.safetensors"}
    return files | {"history": out / f"{name}_history.json", "loss_plot": out / f"{name}_loss.png"}


def _trigger_words(config: TrainConfig) -> str:
    return next((" ".join(d.trigger_words.split()) for d in config.datasets if d.kind == "photos" and d.trigger_words),
                "")


def train_recipe(config: TrainConfig, backbone, data: dict, device: torch.device, progress: Progress | None,
                 log: Callable[[str], None] | None) -> list:
    """The recipe's `TrainedParts` (one per recipe of the run), trained on the encoded `data` (`build_datasets`) with
    the config's distributed strategy."""
    from .customize import train_joint, train_motion, train_subject
    from .dualreal import train_dualreal

    s, workdir = config.settings, config.output.checkpoint_folder
    common = dict(workdir=workdir, progress=progress, log=log, device=device,
                  dtype=_torch_dtype(config.model.training_dtype, device))
    with strategy_used(config.strategy):
        if config.recipe == "subject":
            return [train_subject(backbone, data["subject"], s, **common)]
        if config.recipe == "motion":
            return [train_motion(backbone, data["motion"], s, **common)]
        if config.recipe == "joint":
            return list(train_joint(backbone, data["subject"], data["motion"], s.subject, s.motion, s.optim,
                                    s.motion_probability, controller=s.controller, **common))
        if config.recipe == "synmotion":
            return [_train_synmotion(config, backbone, data, common)]
        return [train_dualreal(backbone, data["subject"], data["motion"], s, **common)]


def _train_synmotion(config: TrainConfig, backbone, data: dict, common: dict):
    """SynMotion on the motion clips and, where given, the prior clips."""
    from .synmotion import train_synmotion

    words = data["synmotion"]
    return train_synmotion(backbone, data["motion"], words.positions, words.motion_phrase, data.get("prior"),
                           config.settings, words.prior_subjects, _prior_fingerprint(config), words.subject_words,
                           words.motion_words, **common)


def write_outputs(config: TrainConfig, backbone, trained: list) -> dict[str, Path]:
    """The run's files (`output_files`), each written atomically."""
    from ..adapters.dualreal import save_dualreal
    from ..adapters.embedding import save_trigger_embedding
    from ..adapters.lora import save_lora
    from ..adapters.synmotion import LearnedSynMotion, save_synmotion
    from ..files import atomic_path
    from ..media import loss_plot, save_png
    from .customize import joint_dualreal
    from .dualreal import dualreal_weights

    files = output_files(config)
    words = _trigger_words(config)
    info = {"config": str(config.source)}
    if config.recipe == "synmotion":  # as Train SynMotion's LORA output and Save SynMotion Embeddings
        save_synmotion(files["synmotion"], LearnedSynMotion.from_exported(trained[0].parts[config.settings.name]))
        words = next(" ".join(d.motion_words.split()) for d in config.datasets if d.use == "motion")
    if "lora" in files:
        save_lora(files["lora"], trained[0].tensors, trained[0].spec, backbone, info,
                  trigger_words=words if config.recipe in ("subject", "synmotion") else "")
    if "subject_lora" in files:
        save_lora(files["subject_lora"], trained[0].tensors, trained[0].spec, backbone, info, trigger_words=words)
        save_lora(files["motion_lora"], trained[1].tensors, trained[1].spec, backbone, info, trigger_words="")
        save_dualreal(files["dualreal"], joint_dualreal(tuple(trained), backbone))
    if config.recipe == "dualreal":
        save_dualreal(files["dualreal"], dualreal_weights(trained[0], config.settings.name))
    if "trigger_embedding" in files:
        save_trigger_embedding(files["trigger_embedding"], trained[0].learned_trigger())
    history = trained[0].history
    with atomic_path(files["history"]) as tmp:
        tmp.write_text(json.dumps(history, indent=1))
    save_png(loss_plot(history)[0], files["loss_plot"])
    return files


def train_from_config(config: TrainConfig, progress: Progress | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Run a config: load the base model, encode the datasets, train the recipe (resuming a matching checkpoint in
    the checkpoint folder), write the files. `progress(step, total, record)` after each step (it may raise to stop;
    the checkpoint of the last `checkpoint_every` is kept); `log`: what became of the checkpoint. Returns the files
    written, by what they are (`output_files`)."""
    from ..backbones.wan import describe
    from .datasets import buckets_of

    device = _device(config.model.device)
    weights = _torch_dtype(config.model.dtype, device)
    data = build_datasets(config, device, weights)
    model = load_wan_transformer(config.model.path, weights)
    if config.strategy == "fsdp" and process_count() > 1:  # the blocks reach the GPU one by one, as they are sharded
        _to_device_but_blocks(model, device)
    else:
        model = model.to(device)
    backbone = describe(model)
    width = buckets_of(next(iter(data.values())))[0].context.shape[-1]
    if width != backbone.text_dim:
        raise InputError("[model] text_encoder", f"it encodes {width}-wide text and the model takes {backbone.text_dim}",
                         "the text encoder the model was trained with (Wan: UMT5-XXL)")
    trained = train_recipe(config, backbone, data, device, progress, log)
    return write_outputs(config, backbone, trained) if is_main_process() else output_files(config)


def _to_device_but_blocks(model: torch.nn.Module, device: torch.device) -> None:
    inside = {id(t) for t in (*model.blocks.parameters(), *model.blocks.buffers())}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in inside:
            t.data = t.data.to(device)


def dry_run(config: TrainConfig) -> dict:
    """What `train_from_config` would do, without loading a model: the resolved config, each dataset's items, the
    steps (and those a checkpoint already holds) and the files it would write."""
    datasets = []
    for data in config.datasets:
        if data.cache is not None:
            datasets.append({"cache": str(data.cache), "kind": data.kind, "use": data.use})
            continue
        items = dataset_items(data)
        datasets.append({"path": str(data.path), "kind": data.kind, "use": data.use, "items": len(items),
                         "masks": sum(i.mask is not None for i in items),
                         "captions": sorted({i.caption for i in items})})
    checkpoint = config.output.checkpoint_folder / CHECKPOINT_FILE
    return {"config": config.as_dict(), "recipe": config.recipe, "steps": config.optim.steps, "datasets": datasets,
            "checkpoint": str(checkpoint) + (" (exists: a matching one is resumed)" if checkpoint.exists() else ""),
            "writes": {k: str(v) for k, v in output_files(config).items()}}
