"""Atomic, verified training checkpoints: the adapter, the optax state, step, data and RNG position.

A checkpoint is a directory ``step_00000100/`` under a checkpoint root, holding

- ``state.safetensors``: every array leaf of the adapter (``adapter.weights.<dotted path>``), of the
  optax state (``opt_state.<dotted path>``) and the RNG key (``rng_key``);
- ``manifest.json``: format version, step, ``examples_seen`` (the data position, see
  :mod:`lora_jax.training.text_data`), the per-step training losses and held-out evaluations so
  far, the run config the checkpoint belongs to, the run's history (starts, resumes, changed
  settings), the name, shape and dtype of every tensor, the size and SHA-256 of
  ``state.safetensors``, and the SHA-256 of the manifest itself (``manifest_sha256``).

Saves are atomic and never hold a NaN: a state with a non-finite array, loss or evaluation is
refused; everything is written into a temporary sibling directory, flushed, then put in place by
one rename (an atomic exchange when the same step is saved again), so a process killed at any
moment leaves the previous checkpoint whole. Restores check the digests (a truncated or altered
file is *damaged*), then the run config and every tensor name, shape and dtype against templates
(another run's checkpoint is a *mismatch*), before building any state.
:func:`latest_intact_checkpoint` skips damaged checkpoints and names them.

>>> import tempfile, jax.numpy as jnp
>>> state = TrainState(step=3, adapter={"w": jnp.ones((2, 2))}, opt_state=(jnp.zeros((), jnp.int32),),
...                    rng_key=jnp.array([0, 7], jnp.uint32), examples_seen=12, losses=(2.5, 2.0, 1.5))
>>> root = tempfile.mkdtemp()
>>> path = save_checkpoint(root, state, {"rank": 4})
>>> path.name, latest_checkpoint(root) == path
('step_00000003', True)
>>> back = restore_checkpoint(path, state, {"rank": 4})
>>> back.step, back.examples_seen, back.losses, float(back.adapter["w"].sum())
(3, 12, (2.5, 2.0, 1.5), 4.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lora_jax.atomic_files import fsync_path, make_dir, remove_stale_temps, replace_dir, temp_sibling

logger = logging.getLogger(__name__)

FORMAT_NAME = "lora-parity-train-checkpoint"
FORMAT_VERSION = 2  # 2: the Adapter value under 'adapter'; file and manifest digests; run history
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MANIFEST_KEYS = ("step", "examples_seen", "losses", "evals", "run_config", "history", "tensors", "files")


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly where it stopped.

    Attributes:
        step: optimizer steps completed.
        adapter: the ``lora_jax.Adapter`` being trained (any pytree of arrays works).
        opt_state: the optax state for ``adapter``.
        rng_key: the run's base PRNG key (raw ``uint32`` or typed key).
        examples_seen: training windows consumed, the data position.
        losses: training loss of every completed step, for the loss curve.
        evals: ``(step, held-out loss)`` pairs measured so far.
        history: JSON records of the run's life (start, resumes, settings changed on resume).
    """

    step: int
    adapter: Any
    opt_state: Any
    rng_key: Any
    examples_seen: int
    losses: tuple[float, ...]
    evals: tuple[tuple[int, float], ...] = ()
    history: tuple[Mapping[str, Any], ...] = ()


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this run (format, config, names, shapes or dtypes differ)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files are not what was saved: missing, truncated, altered or unreadable."""


class NonFiniteStateError(ValueError):
    """A state to be saved holds NaN or infinity; checkpoints only ever hold finite states."""


class IntactCheckpoint(NamedTuple):
    """The newest checkpoint that passed verification, and the newer ones that did not.

    Attributes:
        path: the checkpoint directory, or None when no intact checkpoint exists.
        damaged: ``(directory, reason)`` for every newer checkpoint that failed verification.
    """

    path: Path | None
    damaged: tuple[tuple[Path, str], ...]


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"Unsupported pytree key {entry!r} in checkpointed state.")


def _is_typed_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _named_leaves(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat ``{name: leaf}`` per tree plus treedefs to rebuild it."""
    named, treedefs = {}, {}
    key = state.rng_key
    trees = {"adapter": state.adapter, "opt_state": state.opt_state,
             "rng_key": jax.random.key_data(key) if _is_typed_key(key) else key}
    for prefix, tree in trees.items():
        leaves, treedefs[prefix] = jax.tree_util.tree_flatten_with_path(tree)
        for path, leaf in leaves:
            name = ".".join([prefix] + [_key_name(e) for e in path])
            if name in named:
                raise ValueError(f"Two state leaves share the checkpoint name {name!r}; rename a dict key "
                                 "so dotted paths are unique.")
            named[name] = leaf
    return named, treedefs


def _spec(leaf: Any) -> dict[str, Any]:
    return {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype))}


def _json_roundtrip(config: Mapping[str, Any]) -> dict[str, Any]:
    # Compare configs the way they are stored, so tuples and lists count as equal.
    return json.loads(json.dumps(dict(config), sort_keys=True))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_N`` directory under ``root``, complete or not, oldest step first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``root`` that have a manifest, oldest step first."""
    return [p for _, p in _step_dirs(Path(root)) if (p / MANIFEST_FILE).is_file()]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``root`` (not verified), or ``None`` if there is none."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _check_finite(named: Mapping[str, np.ndarray], state: TrainState) -> None:
    bad = [n for n, a in named.items() if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a))]
    if not all(np.isfinite(state.losses)):
        bad.append("losses")
    if not all(np.isfinite([v for _, v in state.evals])):
        bad.append("evals")
    if bad:
        raise NonFiniteStateError(
            f"Refusing to save step {state.step}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN or "
            "infinity. A checkpoint is a state training can continue from; the previous checkpoint is kept.")


def _write_into(tmp: Path, state: TrainState, arrays: Mapping[str, np.ndarray], run_config: Mapping[str, Any]) -> None:
    data = safetensors.numpy.save(dict(arrays))
    with open(tmp / TENSORS_FILE, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": int(state.step),
        "examples_seen": int(state.examples_seen),
        "losses": [float(x) for x in state.losses],
        "evals": [[int(s), float(v)] for s, v in state.evals],
        "run_config": _json_roundtrip(run_config),
        "history": [_json_roundtrip(record) for record in state.history],
        "tensors": {name: _spec(a) for name, a in sorted(arrays.items())},
        "files": {TENSORS_FILE: {"bytes": len(data), "sha256": _sha256(data)}},
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    with open(tmp / MANIFEST_FILE, "x", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)


def _prune(root: Path, keep: int, saved_step: int) -> None:
    survivors = []
    for step, path in _step_dirs(root):
        if step > saved_step:  # left by a run that has since been rewound to an older checkpoint
            _remove_tree(path)
        elif step != saved_step:
            survivors.append(path)
    for old in survivors[:max(0, len(survivors) - (keep - 1))]:
        _remove_tree(old)
    remove_stale_temps(root)  # leftovers of saves killed mid-write


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    logger.info("removed old checkpoint %s", path)


def save_checkpoint(root: str | os.PathLike, state: TrainState, run_config: Mapping[str, Any],
                    keep: int = 2) -> Path:
    """Atomically writes ``state`` as ``root/step_<step>/`` and keeps the newest ``keep`` checkpoints.

    Checkpoints with a higher step than ``state.step`` are removed too: they belong to a run that
    was rewound to an older checkpoint (because a newer one was damaged, say).

    Args:
        root: checkpoint root directory (created if missing).
        state: the state to save; array leaves are copied to host.
        run_config: JSON-serialisable settings that a resume must match.
        keep: how many of the newest checkpoints to keep, at least 1.

    Returns:
        The final checkpoint directory.

    Raises:
        NonFiniteStateError: a float array, loss or evaluation of ``state`` is NaN or infinite;
            nothing was written.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 so the newest good checkpoint survives, got {keep}.")
    named, _ = _named_leaves(state)
    arrays = {name: np.asarray(leaf) for name, leaf in named.items()}
    _check_finite(arrays, state)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{int(state.step):08d}"
    tmp = make_dir(temp_sibling(final))
    try:
        _write_into(tmp, state, arrays, run_config)
        replace_dir(tmp, final)  # the same step saved again is exchanged in one step, never deleted first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, int(state.step))
    return final


def _damaged(path: Path, why: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"Checkpoint {path} is damaged: {why}. It cannot be resumed from; an older "
                                  "intact checkpoint can.")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the manifest of the checkpoint directory ``path`` and checks its own digest.

    Raises:
        FileNotFoundError: ``path`` has no manifest.
        CheckpointDamagedError: the manifest is not JSON, not an object, misses keys or fails its digest.
        CheckpointMismatchError: another format or version (an intact checkpoint this code cannot read).
    """
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {MANIFEST_FILE} in {path}: not a checkpoint directory.")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, f"{MANIFEST_FILE} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"{MANIFEST_FILE} must hold a JSON object, got {type(manifest).__name__}")
    recorded = manifest.get("manifest_sha256")
    if recorded is not None and recorded != _manifest_digest(manifest):
        raise _damaged(path, f"{MANIFEST_FILE} does not match its own SHA-256 (altered after it was written)")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{file} has format {manifest.get('format')!r} version {manifest.get('version')!r}; this code "
            f"reads {FORMAT_NAME!r} version {FORMAT_VERSION}. Start a fresh run in another directory.")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if recorded is None or missing:
        raise _damaged(path, f"{MANIFEST_FILE} lacks {', '.join(missing) or 'manifest_sha256'}")
    return manifest


def _read_tensors_file(path: Path, manifest: Mapping[str, Any]) -> bytes:
    """The bytes of the tensors file, after checking size and SHA-256 against the manifest."""
    expected = manifest["files"].get(TENSORS_FILE)
    if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
        raise _damaged(path, f"{MANIFEST_FILE} records no size and digest for {TENSORS_FILE}")
    try:
        data = (path / TENSORS_FILE).read_bytes()
    except FileNotFoundError:
        raise _damaged(path, f"{TENSORS_FILE} is missing") from None
    if len(data) != expected["bytes"]:
        raise _damaged(path, f"{TENSORS_FILE} has {len(data)} bytes, {expected['bytes']} were saved (truncated?)")
    if _sha256(data) != expected["sha256"]:
        raise _damaged(path, f"{TENSORS_FILE} does not match its SHA-256 (bytes altered after saving)")
    return data


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Checks a checkpoint's manifest digest and its tensor file's size and digest; returns the manifest.

    Raises:
        FileNotFoundError: no manifest (not a checkpoint).
        CheckpointDamagedError: a file is missing, truncated, altered or unreadable.
        CheckpointMismatchError: another format or version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _read_tensors_file(path, manifest)
    return manifest


def latest_intact_checkpoint(root: str | os.PathLike) -> IntactCheckpoint:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, and the damaged newer ones.

    A step directory without a manifest counts as damaged (saves put complete directories in place,
    so only damage after the save removes one). Each damaged checkpoint is logged as a warning.

    Raises:
        CheckpointMismatchError: an intact checkpoint of another format version is newer than any
            usable one (it is not skipped: it belongs to a run this code cannot continue).
    """
    damaged = []
    for _, path in reversed(_step_dirs(Path(root))):
        try:
            verify_checkpoint(path)
        except FileNotFoundError:
            damaged.append((path, f"Checkpoint {path} is damaged: it has no {MANIFEST_FILE}."))
        except CheckpointDamagedError as err:
            damaged.append((path, str(err)))
        else:
            return IntactCheckpoint(path, tuple(damaged))
        logger.warning("%s", damaged[-1][1])
    return IntactCheckpoint(None, tuple(damaged))


def _config_diff(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    keys = sorted((set(stored) | set(current)) - set(ignore))
    return [f"{k}: checkpoint {stored.get(k, '<missing>')!r}, this run {current.get(k, '<missing>')!r}"
            for k in keys if stored.get(k, "<missing>") != current.get(k, "<missing>")]


def _check_tensors(path: Path, manifest: Mapping[str, Any], expected: Mapping[str, Any],
                   loaded: Mapping[str, np.ndarray]) -> None:
    want = {name: _spec(leaf) for name, leaf in expected.items()}
    problems = [f"missing tensor {n}" for n in sorted(set(want) - set(loaded))]
    problems += [f"unexpected tensor {n}" for n in sorted(set(loaded) - set(want))]
    problems += [f"{n}: checkpoint {manifest['tensors'].get(n)}, expected {spec}"
                 for n, spec in sorted(want.items()) if n in loaded and manifest["tensors"].get(n) != spec]
    # The file's own shapes and dtypes too: a manifest that disagrees with it must not pass.
    problems += [f"{n}: {TENSORS_FILE} holds {_spec(loaded[n])}, expected {spec}"
                 for n, spec in sorted(want.items()) if n in loaded and _spec(loaded[n]) != spec]
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not fit this run's state:\n  " + "\n  ".join(problems[:20])
            + "\nIt was written for another model, LoRA rank or targets, or another optimizer; resume it with "
            "those, or start a fresh run in another directory.")


def restore_checkpoint(path: str | os.PathLike, template: TrainState, run_config: Mapping[str, Any], *,
                       may_differ: Collection[str] = ()) -> TrainState:
    """Loads a checkpoint after verifying it and validating it against ``run_config`` and ``template``.

    The tensor file is read once, and those bytes are checked against the manifest's size and
    SHA-256, parsed and checked (every name, shape and dtype) before any state is built, so a
    damaged or foreign checkpoint raises and leaves the caller's state untouched.

    Args:
        path: a checkpoint directory written by :func:`save_checkpoint`.
        template: a state with the expected structure (e.g. fresh ``init_lora``/``tx.init``);
            its ``step``, ``examples_seen``, ``losses``, ``evals`` and ``history`` are ignored.
        run_config: the current run's settings; must equal the stored ones except ``may_differ``.
        may_differ: run-config keys allowed to change (settings that leave the state layout alone,
            such as a learning rate); the caller records the change.

    Returns:
        The restored state, with ``jax.Array`` leaves and the stored history.

    Raises:
        CheckpointDamagedError: a file is missing, truncated, altered or unreadable.
        CheckpointMismatchError: the checkpoint belongs to another run or another state layout.
    """
    path = Path(path)
    manifest = read_manifest(path)
    diff = _config_diff(manifest["run_config"], _json_roundtrip(run_config), may_differ)
    if diff:
        raise CheckpointMismatchError(
            f"Checkpoint {path} was written by a run with different settings:\n  " + "\n  ".join(diff)
            + "\nResume it with the settings it was written with, or start a fresh run in another directory.")
    data = _read_tensors_file(path, manifest)
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise _damaged(path, f"{TENSORS_FILE} cannot be parsed ({err})") from None
    expected, treedefs = _named_leaves(template)
    _check_tensors(path, manifest, expected, arrays)
    trees = {}
    for prefix, treedef in treedefs.items():
        names = [n for n in expected if n == prefix or n.startswith(prefix + ".")]
        trees[prefix] = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n]) for n in names])
    key = trees["rng_key"]
    if _is_typed_key(template.rng_key):
        key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(template.rng_key))
    return TrainState(step=int(manifest["step"]), adapter=trees["adapter"], opt_state=trees["opt_state"],
                      rng_key=key, examples_seen=int(manifest["examples_seen"]),
                      losses=tuple(float(x) for x in manifest["losses"]),
                      evals=tuple((int(s), float(v)) for s, v in manifest["evals"]),
                      history=tuple(manifest["history"]))
