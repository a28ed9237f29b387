"""Reading and writing weight files: safetensors or weights-only torch files, atomic writes,
and user-typed file names kept inside a root folder."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds.

    A crash or an exception never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    usual_mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # Some writers (safetensors) replace the file with an owner-only one of their own.
        os.chmod(tmp, usual_mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_file_beside(path: Path) -> Path:
    """Create an empty file with an unused name beside `path`, with the usual permissions.

    Created with mode 0666, to which the system applies the user's umask (0644 under the common 022), as
    for any file the user's programs write. tempfile.mkstemp would make it owner-only (0600), and reading the
    umask to correct that means setting it, which races with other threads creating files.
    """
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no unused temporary name beside {path}")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, Any] | None = None) -> Path:
    """Save tensors atomically. Metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def _check_file(path: str | os.PathLike, input_name: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(input_name, f"file '{path}' does not exist",
                         "the path of an existing weights file")
    return path


def load_safetensors(path: str | os.PathLike, input_name: str = "file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata, with a clear error for a corrupt file."""
    from safetensors import safe_open

    path = _check_file(path, input_name)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise InputError(input_name, f"'{path.name}' is not a readable safetensors file ({e})",
                         "a complete .safetensors file") from e
    return tensors, meta


def load_state_dict(path: str | os.PathLike, input_name: str = "file") -> dict[str, torch.Tensor]:
    """Load weights from .safetensors, or from a torch file with `weights_only=True` (no pickle code)."""
    path = _check_file(path, input_name)
    if path.suffix == ".safetensors":
        return load_safetensors(path, input_name)[0]
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(input_name, f"'{path.name}' has an unknown suffix",
                         f"one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # PyTorch's own message advises loading it with code allowed: not here
        raise InputError(input_name, f"'{path.name}' could not be read as a weights-only file: it holds Python objects "
                         "other than tensors, which CustVid does not load (loading them could run code)",
                         "weights only: a .safetensors file, or a torch file of tensors") from None
    except Exception as e:
        raise InputError(input_name, f"'{path.name}' could not be read as a weights-only torch file "
                         f"({type(e).__name__})", "an uncorrupted checkpoint saved with torch.save or safetensors") from e
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(input_name, f"'{path.name}' does not hold a dictionary of tensors",
                         "a state dict of model weights")
    return sd


# The longest file or folder name most file systems accept, in bytes.
MAX_NAME_BYTES = 255


def path_inside(root: str | os.PathLike, name: str, input_name: str) -> Path:
    """Resolve a file name a user typed under `root`, refusing anything that escapes it or that no file
    system takes (an empty or blank name, a NUL character, a name over 255 bytes)."""
    if not name or not name.strip():
        raise InputError(input_name, "the file name is empty", "a file name such as 'my_subject'")
    if "\0" in name:
        raise InputError(input_name, f"{name!r} holds a NUL character", "a file name of printable characters")
    too_long = next((part for part in Path(name).parts if len(os.fsencode(part)) > MAX_NAME_BYTES), None)
    if too_long is not None:
        raise InputError(input_name, f"'{too_long[:40]}...' is {len(os.fsencode(too_long))} bytes long",
                         f"file and folder names of at most {MAX_NAME_BYTES} bytes")
    root = Path(root).resolve()
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise InputError(input_name, f"'{name}' points outside {root}",
                         "a name or a relative path inside that folder, without '..' or a drive")
    if target == root:
        raise InputError(input_name, f"'{name}' names the folder itself", "a file name")
    return target
