"""JSON files that must hold one object, read with errors that name the file and the fix.

Both halves, parity and the examples read ``config.json`` and ``adapter_config.json`` this way.

Example:
    >>> parse_json_object(b'{"r": 8}', "c.json")
    {'r': 8}
    >>> parse_json_object(b"[]", "c.json")
    Traceback (most recent call last):
    ...
    ValueError: c.json must hold a JSON object, found list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["parse_json_object", "read_json_object"]


def parse_json_object(data: bytes, source: str) -> dict:
    """Parses the bytes of a JSON object; a ValueError names ``source`` when they are not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source} is not valid JSON ({err}); the file is truncated or corrupt, "
                         "save it again.") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{source} must hold a JSON object, found {type(obj).__name__}.")
    return obj


def read_json_object(path: str | os.PathLike) -> dict:
    """Reads a JSON object from ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: not UTF-8 JSON, or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a JSON file there.")
    return parse_json_object(path.read_bytes(), str(path))
