"""Files and directories replaced atomically, for the JAX half: checkpoints, run directories, exports.

A write builds the new file or directory under a temporary name beside the target
(``.<target name>.tmp-<pid>-<8 hex>``) and renames it into place, so a reader or a crash sees the
old content or the complete new one, never half of it. The next write of the same target removes
temporaries whose writer died or that are older than ``STALE_AFTER_S``. New files and directories
get the usual modes, ``0o666``/``0o777`` less the umask.

The implementation is ``lora_format.atomic``, shared with ``lora_torch`` and the adapter
directories of ``lora_format.adapter_dir``; this module re-exports the names the JAX half uses.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> target = Path(tempfile.mkdtemp()) / "config.json"
    >>> atomic_write_text(target, "{}\\n")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{}\\n', ['config.json'])
    >>> oct(target.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    True
"""

from __future__ import annotations

from lora_format.atomic import (
    STALE_AFTER_S,
    atomic_write,
    atomic_write_text,
    current_umask,
    fsync_path,
    make_dir,
    remove_stale_temps,
    replace_dir,
    temp_sibling,
)

__all__ = [
    "atomic_write", "atomic_write_text", "current_umask", "fsync_path", "make_dir", "remove_stale_temps",
    "replace_dir", "temp_sibling",
]
