"""PEFT adapter directories that a crash or a second writer cannot tear, and reads pinned to one save.

An adapter is two files that only make sense together: ``adapter_config.json`` (rank, alpha,
targets) and ``adapter_model.safetensors`` (the tensors). Replacing them one file at a time leaves
a window, and a crash in it, where new weights sit beside the old config, which loads silently with
the wrong scaling. So a save here replaces the whole directory in one step:

1. the new adapter is written completely into a temporary sibling ``.<name>.tmp-<pid>-<hex>``,
   its files get the usual modes (``0o666`` less the umask, not mkstemp's ``0o600``), and every
   file and the directory are fsynced;
2. on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps that directory and the target atomically (a plain
   rename cannot replace a non-empty directory); when the target does not exist yet, a plain rename;
3. the temporary name, which now holds the previous adapter, is removed, and so are temporaries
   left by writers that died (their pid is gone) or that are older than ``STALE_AFTER_S``.

Because the whole directory is replaced, a save refuses (before writing anything) a target that
holds files other than an adapter's; PEFT's ``README.md`` is the one such file it carries over.

A reader opens the directory once and opens its files relative to that handle
(``open_adapter_dir``), then checks that the path still names the directory it opened, so it never
mixes files of two saves even when a save swaps in mid-read. The weights also carry the sha256 of the
exact config bytes in their safetensors metadata (``CONFIG_DIGEST_KEY``), so a config and weights
from different saves are refused whatever put them together. PEFT writes no such key; its adapters
load as before, and ``peft`` ignores the key in ours.

Where ``RENAME_EXCHANGE`` is missing (not Linux, or a filesystem that answers EINVAL), a save falls
back to three renames: old aside, new in, old removed. A reader may then find no directory for a
moment; it retries briefly and never mixes two saves. A crash between the first two renames leaves
the previous adapter under a ``.<name>.tmp-*`` name (until the next save), which the reader's
``FileNotFoundError`` names. Two saves racing there may fail with a clear ``OSError``.

The temporary names, the stale-temporary rule, the usual modes and the ``RENAME_EXCHANGE`` swap are
``lora_format.atomic``'s, shared with single-file writes in both halves; this module adds what is
particular to adapters (the carried-over README, the refusal of foreign files, the retries of racing
saves, pinned reads and the config digest).

Nothing here imports torch or JAX: ``lora_torch`` and ``lora_jax`` save and read through it.

Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "adapter"
    >>> config = encode_config({"peft_type": "LORA", "r": 2})
    >>> def write(directory):
    ...     (directory / CONFIG_NAME).write_bytes(config)
    ...     (directory / WEIGHTS_NAME).write_bytes(b"weights")  # a real writer saves safetensors here
    >>> save_adapter_dir(target, write) == target
    True
    >>> with open_adapter_dir(target) as pinned:
    ...     pinned.names, pinned.read_bytes(CONFIG_NAME) == config
    (('adapter_config.json', 'adapter_model.safetensors'), True)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_format import atomic
from lora_format.atomic import (  # current_umask and usual_mode are re-exported, as before
    STALE_AFTER_S,
    current_umask,
    fsync_path,
    remove_path,
    set_usual_modes,
    temp_sibling,
    usual_mode,
)
from lora_format.atomic import exchange as _exchange  # a module global, so a test can take RENAME_EXCHANGE away

__all__ = [
    "CONFIG_DIGEST_KEY", "CONFIG_NAME", "PICKLED_WEIGHTS_NAME", "WEIGHTS_NAME", "AdapterFiles", "PinnedAdapterDir",
    "check_config_digest", "config_digest", "encode_config", "open_adapter_dir", "read_adapter_files",
    "current_umask", "remove_stale_temps", "safetensors_header", "safetensors_metadata", "save_adapter_dir", "set_usual_modes",
    "temp_sibling", "usual_mode", "weights_metadata",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT; readers must use torch.load(weights_only=True)
# The adapter's own files: a save replaces them all. README.md (PEFT's model card) is carried over.
ADAPTER_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PICKLED_WEIGHTS_NAME)
CARRIED_NAMES = ("README.md",)
CONFIG_DIGEST_KEY = "lora_parity.config_sha256"
# PEFT's multi-adapter layout (PeftModel.save_pretrained): the adapter named "default" at the root, every other
# adapter in a subdirectory named after it.
DEFAULT_ADAPTER = "default"
_PIN_ATTEMPTS = 50  # a reader retries while saves swap directories under it


def encode_config(config: dict) -> bytes:
    """Returns the bytes of ``adapter_config.json``: indented, sorted keys, strict JSON (no NaN/Infinity).

    >>> encode_config({"r": 8, "lora_alpha": 16.0})
    b'{\\n  "lora_alpha": 16.0,\\n  "r": 8\\n}\\n'
    >>> encode_config({"lora_alpha": float("inf")})
    Traceback (most recent call last):
    ...
    ValueError: adapter config values must be finite numbers (JSON has no NaN or Infinity): Out of range float values are not JSON compliant: inf
    """
    try:
        return (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except ValueError as err:
        raise ValueError(f"adapter config values must be finite numbers (JSON has no NaN or Infinity): {err}") from None


def config_digest(config_bytes: bytes) -> str:
    """Returns the sha256 hex digest of the exact ``adapter_config.json`` bytes.

    >>> config_digest(b"{}\\n")[:16]
    'ca3d163bab055381'
    """
    return hashlib.sha256(config_bytes).hexdigest()


def weights_metadata(config_bytes: bytes) -> dict[str, str]:
    """Returns the safetensors metadata for weights saved with this config: PEFT's format tag plus the digest.

    >>> sorted(weights_metadata(b"{}\\n"))
    ['format', 'lora_parity.config_sha256']
    """
    return {"format": "pt", CONFIG_DIGEST_KEY: config_digest(config_bytes)}


def _corrupt(source: str, why: str) -> ValueError:
    return ValueError(f"{source} is not a readable safetensors file ({why}); it is truncated or corrupt, save it again.")


def safetensors_header(data: bytes, source: str) -> dict:
    """Returns the JSON header of a safetensors file's bytes: tensor entries and ``__metadata__``.

    Raises:
        ValueError: the header is truncated or is not a safetensors header.

    >>> header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    >>> safetensors_header(struct.pack("<Q", len(header)) + header + bytes(8), "w.safetensors")["w"]["shape"]
    [2]
    >>> safetensors_header(b"\\x00" * 4, "w.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: w.safetensors is not a readable safetensors file (4 bytes, shorter than its 8-byte header length); it is truncated or corrupt, save it again.
    """
    if len(data) < 8:
        raise _corrupt(source, f"{len(data)} bytes, shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise _corrupt(source, f"header of {size} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(source, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _corrupt(source, "header is not a JSON object")
    return header


def safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """Returns the ``__metadata__`` of a safetensors file's bytes (``{}`` when it has none).

    Raises:
        ValueError: the header is truncated or is not a safetensors header.

    >>> header = b'{"__metadata__": {"format": "pt"}}'
    >>> safetensors_metadata(struct.pack("<Q", len(header)) + header, "w.safetensors")
    {'format': 'pt'}
    """
    metadata = safetensors_header(data, source).get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(source, "__metadata__ is not a str -> str mapping")
    return metadata


def check_config_digest(config_bytes: bytes, metadata: dict[str, str], source: str) -> None:
    """Raises unless the weights' recorded config digest (if any) is the digest of ``config_bytes``.

    >>> check_config_digest(b"{}\\n", weights_metadata(b"{}\\n"), "adapter")
    >>> check_config_digest(b"{}\\n", {"format": "pt"}, "adapter")  # saved by PEFT: nothing to compare
    """
    recorded = metadata.get(CONFIG_DIGEST_KEY)
    if recorded is not None and recorded != config_digest(config_bytes):
        raise ValueError(
            f"{source}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves (the weights were saved "
            f"with config sha256 {recorded[:12]}..., the config on disk has {config_digest(config_bytes)[:12]}...). "
            "A save was interrupted, two saves were mixed, or the config was edited after saving; nothing was "
            "loaded. Save the adapter again from the model. To keep a config edited on purpose, re-save the "
            f"weights without the {CONFIG_DIGEST_KEY!r} metadata entry.")


def remove_stale_temps(target: str | os.PathLike, *, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Removes the temporaries of ``target`` left by writers that died or that are older than ``max_age_s``.

    Works for temporary files and directories alike. Returns the paths removed. The rule is
    ``lora_format.atomic.remove_stale_temps``, applied to ``target``'s own temporaries only.
    """
    target = Path(target)
    return atomic.remove_stale_temps(target.parent, target.name, max_age_s=max_age_s)


def _check_replaceable(target: Path) -> list[str]:
    """Returns the carried-over names in an existing ``target``; raises for anything it must not delete."""
    if not os.path.lexists(target):
        return []
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; an adapter is a directory. Choose another "
                         "path, or remove that file first.")
    entries = sorted(os.listdir(target))
    unknown = [e for e in entries if e not in ADAPTER_NAMES and e not in CARRIED_NAMES
               and not _is_named_adapter_dir(target / e)]
    if unknown:
        raise ValueError(f"{target} holds files that are not part of an adapter: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}. Saving replaces the whole directory, so nothing "
                         "was written. Save the adapter into its own directory, or move those files out.")
    return [e for e in entries if e in CARRIED_NAMES]


def _is_named_adapter_dir(path: Path) -> bool:
    """A subdirectory of a multi-adapter save: a real directory holding adapter files and nothing else."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = os.listdir(path)
    return bool(entries) and all(e in ADAPTER_NAMES or e in CARRIED_NAMES for e in entries)


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter of a multi-adapter directory (a subdirectory name), else ValueError.

    >>> check_adapter_name("task_a")
    'task_a'
    >>> check_adapter_name("../x")
    Traceback (most recent call last):
    ...
    ValueError: adapter name '../x' cannot name a subdirectory: use letters, digits, '_', '-' and '.', not starting with '.' and not a file name of an adapter.
    """
    if (not isinstance(name, str) or not name or name.startswith(".") or not all(c.isalnum() or c in "_-." for c in name)
            or name in ADAPTER_NAMES or name in CARRIED_NAMES):
        raise ValueError(f"adapter name {name!r} cannot name a subdirectory: use letters, digits, '_', '-' and '.', "
                         "not starting with '.' and not a file name of an adapter.")
    return name


def named_adapter_subdir(directory: Path, name: str) -> Path:
    """Where PEFT keeps adapter ``name`` in a multi-adapter save: the root for ``"default"``, else ``directory/name``."""
    return directory if check_adapter_name(name) == DEFAULT_ADAPTER else directory / name


def _fsync_tree(path: Path) -> None:
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            set_usual_modes(entry)
            _fsync_tree(entry)
        fsync_path(entry)


def _swap_in(new: Path, target: Path) -> None:
    """Puts ``new`` at ``target``; afterwards ``new`` holds the previous adapter, or nothing."""
    for _ in range(10):
        if os.path.lexists(target):
            try:
                if not _exchange(new, target):
                    _three_renames(new, target)
                return
            except FileNotFoundError:
                continue  # a fallback saver moved the target aside just now: rename into the free name
        try:
            os.rename(new, target)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # else another saver created the target first: exchange with it
    raise OSError(f"could not put the new adapter at {target}: other saves kept replacing it; save again.")


def _three_renames(new: Path, target: Path) -> None:
    """The fallback without RENAME_EXCHANGE: old aside, new in. Leaves the old adapter at ``new``."""
    aside = temp_sibling(target)
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.rename(aside, target)
        remove_path(aside)  # still here only if the other save took the target: then it is superseded
        raise OSError(f"could not put the new adapter at {target} ({err}); another save replaced it at the same "
                      "time. The directory holds one whole adapter; save again if it is not yours.") from err
    os.rename(aside, new)


def save_adapter_dir(target: str | os.PathLike, write_files: Callable[[Path], None]) -> Path:
    """Replaces the adapter directory ``target`` in one atomic step with what ``write_files`` writes.

    ``write_files(directory)`` writes the adapter's files (``CONFIG_NAME``, ``WEIGHTS_NAME``) into a
    fresh, empty temporary directory next to ``target`` - for several adapters, PEFT's layout: the
    ``"default"`` one at the root and each other in a subdirectory named after it
    (``named_adapter_subdir``); the whole set is swapped in at once. A ``README.md`` already in
    ``target`` is carried over. Files and directories get the usual modes (``0o666``/``0o777`` less
    the umask).

    Args:
        target: the adapter directory; created with its parents if needed. A symlink is followed,
            and the directory it points to is replaced.
        write_files: writes the new adapter's files into the directory it is given.

    Returns:
        ``target``.

    Raises:
        ValueError: ``target`` is a file, or holds files other than an adapter's, ``README.md`` and
            subdirectories holding only those (a save replaces the whole directory, so it refuses
            before writing anything).
        OSError: the filesystem refused, or other saves kept replacing ``target``.
        Whatever ``write_files`` raises; ``target`` is then left as it was.
    """
    final = Path(os.path.realpath(target))
    carried = _check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    new = temp_sibling(final)
    os.mkdir(new)
    try:
        for name in carried:
            with contextlib.suppress(FileNotFoundError):  # a concurrent save may have just swapped the target
                shutil.copyfile(final / name, new / name)
        write_files(new)
        set_usual_modes(new)
        _fsync_tree(new)  # files, and the subdirectories of a multi-adapter save with theirs
        fsync_path(new)
        _swap_in(new, final)
        fsync_path(final.parent)
    finally:
        remove_path(new)  # the partial new adapter on failure, the previous one on success
    remove_stale_temps(final)
    return Path(target)


@dataclass(frozen=True)
class PinnedAdapterDir:
    """The adapter files of one save, held open: reads return that save's bytes even if another swaps in.

    Attributes:
        path: the directory as the caller named it (for messages).
        names: the adapter files present (``ADAPTER_NAMES`` members), in that order.
    """

    path: Path
    names: tuple[str, ...]
    _handles: dict[str, int] = field(repr=False)

    def read_bytes(self, name: str) -> bytes:
        """Returns the whole content of the pinned file ``name``."""
        if name not in self._handles:
            raise FileNotFoundError(f"{self.path} has no {name}.")
        handle, chunks, offset = self._handles[name], [], 0
        while chunk := os.pread(handle, 1 << 24, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


def _missing_dir_error(path: Path) -> FileNotFoundError:
    leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
    hint = (f" An interrupted save left {leftovers}; one may hold the previous adapter: rename it to {path.name} "
            "if it has an adapter_config.json.") if leftovers else ""
    return FileNotFoundError(f"{path} does not exist; expected an adapter directory there.{hint}")


def _pin_once(path: Path) -> PinnedAdapterDir | None:
    """Opens the adapter files relative to one open of the directory; None if a save swapped it meanwhile."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    handles: dict[str, int] = {}
    try:
        for name in ADAPTER_NAMES:
            with contextlib.suppress(FileNotFoundError):
                handles[name] = os.open(name, os.O_RDONLY, dir_fd=directory)
        # A directory is emptied only after a save swapped it out, so if ``path`` still names the one we
        # opened, every file we found (or missed) was there for this save.
        held, now = os.fstat(directory), os.stat(path)
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return PinnedAdapterDir(path, tuple(handles), handles)
    except FileNotFoundError:
        pass
    except BaseException:
        for handle in handles.values():
            os.close(handle)
        raise
    finally:
        os.close(directory)
    for handle in handles.values():
        os.close(handle)
    return None


@contextlib.contextmanager
def open_adapter_dir(path: str | os.PathLike) -> Iterator[PinnedAdapterDir]:
    """Pins the adapter directory ``path`` to one save and yields its files, closed on exit.

    Reads through the yielded value come from one save even when another save replaces ``path``
    meanwhile. Temporary directories of saves in progress are never read.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names leftovers of an interrupted save).
        NotADirectoryError: ``path`` is a file.
        OSError: saves replaced ``path`` on every one of many attempts to open it.
    """
    path = Path(path)
    for attempt in range(_PIN_ATTEMPTS):
        try:
            pinned = _pin_once(path)
        except FileNotFoundError:
            pinned = None  # without RENAME_EXCHANGE a save leaves no directory for a moment
            if attempt >= 5:
                raise _missing_dir_error(path) from None
        if pinned is not None:
            break
        time.sleep(0.001 * attempt)
    else:
        raise OSError(f"{path} was replaced by other saves during each of {_PIN_ATTEMPTS} attempts to read it; "
                      "read it again when the saves are done.")
    try:
        yield pinned
    finally:
        for handle in pinned._handles.values():
            os.close(handle)


@dataclass(frozen=True)
class AdapterFiles:
    """The two files of one adapter save, read whole and checked to belong together.

    Attributes:
        directory: where they were read from.
        config: the exact bytes of ``adapter_config.json``.
        weights: the exact bytes of the weights file.
        weights_name: ``WEIGHTS_NAME``, or ``PICKLED_WEIGHTS_NAME`` for older PEFT adapters.
    """

    directory: Path
    config: bytes
    weights: bytes
    weights_name: str


def read_adapter_files(path: str | os.PathLike) -> AdapterFiles:
    """Reads the config and weights of one save of the adapter directory ``path``, and checks their digest.

    The safetensors weights are preferred over ``adapter_model.bin``. The digest is checked only where
    the weights record one (adapters saved by this project; PEFT records none).

    Raises:
        FileNotFoundError: no directory, no config, or no weights file.
        ValueError: config and weights come from different saves, or the safetensors header is corrupt.
    """
    path = Path(path)
    with open_adapter_dir(path) as pinned:
        files = _read_pinned_files(pinned, path)
    return _checked(files)


def _read_pinned_files(pinned: PinnedAdapterDir, path: Path) -> AdapterFiles:
    if CONFIG_NAME not in pinned.names:
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; it is not a PEFT adapter directory.")
    weights_name = next((n for n in (WEIGHTS_NAME, PICKLED_WEIGHTS_NAME) if n in pinned.names), None)
    if weights_name is None:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}; it is not a PEFT adapter directory.")
    return AdapterFiles(path, pinned.read_bytes(CONFIG_NAME), pinned.read_bytes(weights_name), weights_name)


def _checked(files: AdapterFiles) -> AdapterFiles:
    if files.weights_name == WEIGHTS_NAME:
        metadata = safetensors_metadata(files.weights, str(files.directory / files.weights_name))
        check_config_digest(files.config, metadata, str(files.directory))
    return files


def read_named_adapter_files(path: str | os.PathLike) -> dict[str, AdapterFiles]:
    """Reads every adapter of a multi-adapter directory (PEFT's layout), all from one save.

    Returns ``{"default": root files}`` when the root holds an adapter, plus ``{name: files}`` for each
    subdirectory holding an ``adapter_config.json``, sorted by name after ``"default"``. The root
    directory is opened once and every file is opened relative to it, so a concurrent save cannot
    mix the adapters of two saves.

    Raises:
        FileNotFoundError: no directory, or no adapter in it.
        ValueError: a config and its weights come from different saves, or a header is corrupt.
    """
    path = Path(path)
    for attempt in range(_PIN_ATTEMPTS):
        try:
            found = _read_named_once(path)
        except _IncompleteAdapter as err:
            raise FileNotFoundError(str(err)) from None
        except FileNotFoundError:
            found = None
            if attempt >= 5:
                raise _missing_dir_error(path) from None
        if found is not None:
            break
        time.sleep(0.001 * attempt)
    else:
        raise OSError(f"{path} was replaced by other saves during each of {_PIN_ATTEMPTS} attempts to read it.")
    if not found:
        raise FileNotFoundError(f"{path} holds no adapter: no {CONFIG_NAME} at its root or in a subdirectory.")
    return {name: _checked(files) for name, files in found.items()}


class _IncompleteAdapter(Exception):
    """An adapter directory of a save that lacks a file (as opposed to a directory swapped away meanwhile)."""


def _read_named_once(path: Path) -> dict[str, AdapterFiles] | None:
    root = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found, incomplete = {}, None
        for name in [""] + sorted(os.listdir(root)):
            try:
                sub = root if not name else os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
            except (NotADirectoryError, FileNotFoundError):
                continue
            try:
                handles = {}
                for file in ADAPTER_NAMES:
                    with contextlib.suppress(FileNotFoundError):
                        handles[file] = os.open(file, os.O_RDONLY, dir_fd=sub)
                pinned = PinnedAdapterDir(path / name if name else path, tuple(handles), handles)
                try:
                    if CONFIG_NAME in handles:
                        found[name or DEFAULT_ADAPTER] = _read_pinned_files(pinned, pinned.path)
                except FileNotFoundError as err:  # a config without weights: a save swapped out meanwhile, or broken
                    incomplete = incomplete or str(err)
                finally:
                    for handle in handles.values():
                        os.close(handle)
            finally:
                if sub != root:
                    os.close(sub)
        held, now = os.fstat(root), os.stat(path)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            return None  # a save replaced the directory (and may be deleting the files we missed): read again
        if incomplete is not None:  # still the directory at ``path``: it really lacks a file; say which
            raise _IncompleteAdapter(incomplete)
        return found
    finally:
        os.close(root)
