"""Files replaced atomically: written under a temporary name in the same directory, then renamed.

A reader sees either the old file or the complete new one, never a half-written file, because
``os.replace`` within one directory is atomic. The data is flushed to disk before the rename,
so a crash right after it cannot leave an empty file under the final name either.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "config.json"
    >>> atomic_write_text(target, "{}\\n")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{}\\n', ['config.json'])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "fsync_path"]


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(temp_path)``, syncs the file, then renames it over ``target``.

    Taking a writer rather than bytes lets a library that writes to a path (safetensors'
    ``save_file``) stream a large file without a second copy in memory. On any error the
    temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        fsync_path(temp_name)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file, or a directory's entries (after a rename in it), to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Replaces ``target`` with the UTF-8 ``text`` atomically."""
    atomic_write(target, lambda temp_name: Path(temp_name).write_text(text, encoding="utf-8"))
