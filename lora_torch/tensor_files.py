"""Tensor and JSON files on disk: written atomically, read without running pickled code.

A write goes to a temporary file in the destination's directory and is then ``os.replace``d
over the destination, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


@contextlib.contextmanager
def atomic_destination(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> int:
    """Writes ``tensors`` (copied to contiguous CPU tensors) atomically; returns the file size in bytes."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_destination(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


def write_json(obj: object, path: str | os.PathLike) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_destination(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> dict:
    """Reads a JSON object, raising a ValueError that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a JSON file there.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt, save it again.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(obj).__name__}.")
    return obj


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a name->tensor file: safetensors, or ``.pt``/``.pth``/``.bin`` through ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupt, of an unknown suffix, or not a name->tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt, "
                             "save it again.") from err
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            # weights_only=True refuses arbitrary pickled objects, so a hostile file cannot run code.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for bad pickles
            raise ValueError(f"{path} could not be read with torch.load(weights_only=True) ({err}); "
                             "it is corrupt or holds more than tensors. Prefer .safetensors.") from err
    else:
        raise ValueError(f"{path} has suffix {path.suffix!r}; expected .safetensors (or .pt/.pth/.bin).")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{path} must hold a flat mapping of str -> tensor.")
    return tensors
