"""Files and directories replaced atomically: built under a temporary name beside the target, then renamed.

A reader sees either the old file or the complete new one, never a half-written file, because
``os.replace`` within one directory is atomic. The data is flushed to disk before the rename,
so a crash right after it cannot leave an empty file under the final name either.

Temporary names are ``.<target name>.tmp-<pid>-<8 hex>`` (``temp_sibling``). Readers never open
them, and the next write of the same target removes the ones whose writer has died (a SIGKILL skips
every cleanup) or that are older than ``STALE_AFTER_S`` (``remove_stale_temps``). New files and
directories get the usual modes, ``0o666``/``0o777`` less the umask, not the ``0o600``/``0o700``
that ``tempfile`` and safetensors' writer give their files.

A non-empty directory cannot be ``os.replace``d; ``replace_dir`` swaps it in with
``renameat2(RENAME_EXCHANGE)`` on Linux (``exchange``) and falls back to three renames elsewhere.

This is the one implementation both halves use: ``lora_format.adapter_dir`` (whole adapter
directories), ``lora_jax.atomic_files`` and ``lora_torch.tensor_files``. Nothing here imports torch or JAX.

Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "config.json"
    >>> atomic_write_text(target, "{}\\n")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{}\\n', ['config.json'])
    >>> oct(target.stat().st_mode & 0o777) == oct(usual_mode(current_umask()))
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "STALE_AFTER_S", "atomic_destination", "atomic_write", "atomic_write_text", "current_umask", "exchange",
    "fsync_path", "make_dir", "remove_path", "remove_stale_temps", "replace_dir", "set_usual_modes",
    "temp_sibling", "usual_mode",
]

logger = logging.getLogger(__name__)

# A temporary whose writer is still alive is kept this long (pids are reused, and other hosts' pids mean nothing).
STALE_AFTER_S = 3600.0
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_umask_lock = threading.Lock()


def current_umask() -> int:
    """Returns the process umask without changing it where Linux allows (``/proc/self/status``).

    >>> previous = os.umask(0o027)
    >>> oct(current_umask())
    '0o27'
    >>> _ = os.umask(previous)
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_lock:  # elsewhere the only way to read it is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def usual_mode(umask: int, *, directory: bool = False) -> int:
    """Returns the mode a plain ``open``/``mkdir`` gives under ``umask``.

    Temporary-file helpers (``mkstemp``, and safetensors' own writer) give 0o600, which would make a
    saved file unreadable to the rest of a group; writes here restore the usual mode.

    >>> oct(usual_mode(0o022)), oct(usual_mode(0o022, directory=True)), oct(usual_mode(0o077))
    ('0o644', '0o755', '0o600')
    """
    return (0o777 if directory else 0o666) & ~umask


def set_usual_modes(path: str | os.PathLike) -> None:
    """Gives ``path`` (and, for a directory, the regular files in it) the usual modes under the current umask."""
    path, umask = Path(path), current_umask()
    if path.is_dir():
        for entry in path.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, usual_mode(umask))
    os.chmod(path, usual_mode(umask, directory=path.is_dir()))


def temp_sibling(target: str | os.PathLike) -> Path:
    """Returns a fresh temporary name next to ``target``: ``.<name>.tmp-<pid>-<8 hex>``.

    >>> name = temp_sibling("/runs/adapter").name
    >>> _temp_owner(name, "adapter") == os.getpid(), len(name) == len(f".adapter.tmp-{os.getpid()}-") + 8
    (True, True)
    """
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _temp_owner(entry: str, target_name: str | None) -> int | None:
    """The writer pid in a temporary's name, or None if ``entry`` is not a temporary (of ``target_name``).

    >>> _temp_owner(".adapter.tmp-4321-0a1b2c3d", "adapter"), _temp_owner(".adapter.tmp-x-0a1b2c3d", None)
    (4321, None)
    >>> _temp_owner(".adapter.tmp-4321-0a1b2c3d", "other"), _temp_owner(".adapter.tmp-4321-0a1b2c3d", None)
    (None, 4321)
    """
    name = r".+" if target_name is None else re.escape(target_name)
    match = re.fullmatch(rf"\.{name}\.tmp-(\d+)-[0-9a-f]{{8}}", entry)
    return int(match.group(1)) if match else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host.

    >>> _pid_alive(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_path(path: str | os.PathLike) -> None:
    """Removes a file, a symlink or a whole directory tree; nothing if ``path`` is already gone."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike, target_name: str | None = None, *,
                       max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Removes temporaries in ``directory`` whose writer died or that are older than ``max_age_s``.

    Works for temporary files and directories alike.

    Args:
        directory: where to look.
        target_name: only temporaries of this target; None for every temporary in ``directory``.
        max_age_s: the age after which even a live writer's temporary counts as abandoned.

    Returns:
        The paths removed (files or directories).

    >>> import tempfile
    >>> directory = Path(tempfile.mkdtemp())
    >>> (directory / ".a.json.tmp-1-0a1b2c3d").write_text("")  # pid 1 is alive, but this is old:
    0
    >>> [p.name for p in remove_stale_temps(directory, "a.json", max_age_s=0.0)]
    ['.a.json.tmp-1-0a1b2c3d']
    """
    directory = Path(directory)
    removed = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid = _temp_owner(entry, target_name)
        if pid is None:
            continue
        path = directory / entry
        try:
            age = time.time() - path.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer finished or another cleaner was first
        if _pid_alive(pid) and age < max_age_s:
            continue
        remove_path(path)
        removed.append(path)
        logger.info("removed %s, left by an interrupted write (writer pid %d)", path, pid)
    return removed


def make_dir(path: str | os.PathLike) -> Path:
    """Creates the directory ``path`` (not its parents) with mode ``0o777`` less the umask."""
    os.mkdir(path, 0o777)
    return Path(path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file, or a directory's entries (after a rename in it), to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _commit(temp: Path, target: Path) -> None:
    """Gives the finished ``temp`` the usual mode, syncs it and renames it over ``target``."""
    set_usual_modes(temp)  # a writer may have replaced the file with a private (0o600) one
    fsync_path(temp)
    os.replace(temp, target)


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(temp_path)``, syncs the file, then renames it over ``target``.

    Taking a writer rather than bytes lets a library that writes to a path (safetensors'
    ``save_file``) stream a large file without a second copy in memory. On any error the
    temporary file is removed and ``target`` is left as it was. The file gets mode ``0o666``
    less the umask, whatever mode ``write`` created it with.
    """
    target = Path(target)
    remove_stale_temps(target.parent, target.name)
    temp = temp_sibling(target)
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # exclusive: the name is ours
        write(str(temp))
        _commit(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Replaces ``target`` with the UTF-8 ``text`` atomically."""
    atomic_write(target, lambda temp_name: Path(temp_name).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_destination(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    Unlike ``atomic_write`` this creates the missing parents of ``path`` and also syncs the parent
    directory after the rename. Stale temporaries of ``path`` are removed after a successful write.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "runs" / "metrics.json"
    >>> with atomic_destination(target) as temp:
    ...     _ = temp.write_text("{}")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('{}', ['metrics.json'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        _commit(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    remove_stale_temps(path.parent, path.name)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swaps two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``).

    Returns:
        True if swapped; False where the system or filesystem cannot (then nothing moved).

    Raises:
        OSError: the swap failed for another reason (a path is missing, the filesystems differ).
    """
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Puts the complete directory ``new`` at ``target`` and deletes what ``target`` held before.

    ``os.replace`` cannot replace a non-empty directory. On Linux ``renameat2(RENAME_EXCHANGE)``
    swaps the two atomically, so a reader or a crash sees the old directory or the new one, never
    neither. Elsewhere the old directory is first renamed to a temporary name, which a crash between
    the two renames leaves behind (the previous content, under ``.<name>.tmp-<pid>-<hex>``).
    Both paths must be in the same directory (same filesystem). The parent is fsynced.
    """
    new, target = Path(new), Path(target)
    if os.path.lexists(target):
        if not exchange(new, target):
            aside = temp_sibling(target)
            os.rename(target, aside)
            os.rename(new, target)
            os.rename(aside, new)
        fsync_path(target.parent)
        remove_path(new)  # now the previous directory
    else:
        os.rename(new, target)
        fsync_path(target.parent)
