"""Tensor and JSON files on disk: written atomically, read without running pickled code.

A write goes to a temporary file next to the destination (``.<name>.tmp-<pid>-<hex>``, mode
``0o666`` less the umask like any new file), is fsynced and then ``os.replace``d over the
destination, so a crash leaves either the old file or the new one, never half of one. The next
write to the same name removes temporaries left by writers that were killed. The atomic write itself
is ``lora_format.atomic.atomic_destination``, the implementation both halves share.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

# Re-exported: the one implementation of atomic writes is lora_format.atomic, shared with lora_jax.
from lora_format.atomic import atomic_destination, fsync_path
from lora_format.json_files import parse_json_object as parse_json
from lora_format.json_files import read_json_object as read_json

__all__ = [
    "PICKLE_SUFFIXES", "atomic_destination", "fsync_path", "parse_json", "read_json", "read_tensors",
    "tensors_from_bytes", "write_json", "write_safetensors",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


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


def tensors_from_bytes(data: bytes, name: str, source: str) -> dict[str, torch.Tensor]:
    """Reads a name->tensor file's bytes; ``name``'s suffix picks the format, as in ``read_tensors``.

    Raises:
        ValueError: the bytes are truncated, corrupt, of an unknown suffix, or not a name->tensor mapping.
    """
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        try:
            tensors = load(data)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{source} is not a readable safetensors file ({err}); it is truncated or corrupt, "
                             "save it again.") from err
    elif suffix in PICKLE_SUFFIXES:
        try:
            # weights_only=True refuses arbitrary pickled objects, so a hostile file cannot run code.
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for bad pickles
            raise ValueError(f"{source} could not be read with torch.load(weights_only=True) ({err}); "
                             "it is corrupt or holds more than tensors. Prefer .safetensors.") from err
    else:
        raise ValueError(f"{source} has suffix {suffix!r}; expected .safetensors (or .pt/.pth/.bin).")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{source} must hold a flat mapping of str -> tensor.")
    return tensors


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a name->tensor file: safetensors, or ``.pt``/``.pth``/``.bin`` through ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupt, of an unknown suffix, or not a name->tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    return tensors_from_bytes(path.read_bytes(), path.name, str(path))
