"""Atomic, validated training checkpoints: LoRA params, optax state, step, data and RNG position.

A checkpoint is a directory ``step_00000100/`` under a checkpoint root, holding

- ``state.safetensors``: every array leaf of the adapter (``adapter.<dotted path>``), of the
  optax state (``opt_state.<dotted path>``) and the RNG key (``rng_key``);
- ``manifest.json``: format version, step, ``examples_seen`` (the data position, see
  :mod:`lora_jax.training.text_data`), the per-step training losses so far, the run config the
  checkpoint belongs to, the held-out evaluations so far, and the name, shape and dtype of every tensor.

Saves are atomic: everything is written into a temporary directory next to the final one,
flushed, then renamed into place, so a run killed mid-save leaves the previous checkpoint as
the latest good one. Restores validate the manifest, the run config and every tensor name,
shape and dtype against templates before building any state.

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

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax.atomic_files import fsync_path

FORMAT_NAME = "lora-parity-train-checkpoint"
FORMAT_VERSION = 2  # 2: the adapter value (weights + static config) under the name 'adapter'
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    """

    step: int
    adapter: Any
    opt_state: Any
    rng_key: Any
    examples_seen: int
    losses: tuple[float, ...]
    evals: tuple[tuple[int, float], ...] = ()


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this run (config, names, shapes or dtypes differ)."""


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


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``root``, or ``None`` if there is none."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _write_into(tmp: Path, state: TrainState, run_config: Mapping[str, Any]) -> None:
    named, _ = _named_leaves(state)
    arrays = {name: np.asarray(leaf) for name, leaf in named.items()}
    save_file(arrays, tmp / TENSORS_FILE)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": int(state.step),
        "examples_seen": int(state.examples_seen),
        "losses": [float(x) for x in state.losses],
        "evals": [[int(s), float(v)] for s, v in state.evals],
        "run_config": _json_roundtrip(run_config),
        "tensors": {name: _spec(a) for name, a in sorted(arrays.items())},
    }
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp / TENSORS_FILE)


def _prune(root: Path, keep: int) -> None:
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of saves that were killed mid-write; one writer per root is assumed.
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, state: TrainState, run_config: Mapping[str, Any],
                    keep: int = 2) -> Path:
    """Atomically writes ``state`` as ``root/step_<step>/`` and keeps the newest ``keep`` checkpoints.

    Args:
        root: checkpoint root directory (created if missing).
        state: the state to save; array leaves are copied to host.
        run_config: JSON-serialisable settings that a resume must match exactly.
        keep: how many of the newest checkpoints to keep, at least 1.

    Returns:
        The final checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 so the newest good checkpoint survives, got {keep}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{int(state.step):08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        _write_into(tmp, state, run_config)
        if final.exists():  # the same step saved again: move the old copy aside, never delete first
            aside = root / f".tmp-{final.name}-replaced"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks the manifest of the checkpoint directory ``path``."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {MANIFEST_FILE} in {path}: not a checkpoint directory.")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{file} is not valid JSON ({err}); the checkpoint is damaged. Resume from an older "
            "checkpoint directory or start a fresh run with a new --out."
        ) from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(manifest).__name__}; the checkpoint is damaged.")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{file} has format {manifest.get('format')!r} version {manifest.get('version')!r}; this code "
            f"reads {FORMAT_NAME!r} version {FORMAT_VERSION}. Start a fresh run with a new --out.")
    return manifest


def _config_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [f"{k}: checkpoint {stored.get(k, '<missing>')!r}, this run {current.get(k, '<missing>')!r}"
            for k in keys if stored.get(k, "<missing>") != current.get(k, "<missing>")]


def _check_tensors(path: Path, manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    want = {name: _spec(leaf) for name, leaf in expected.items()}
    with safe_open(path / TENSORS_FILE, framework="np") as f:
        # Shapes from the file's own header too: a manifest that disagrees with it must not pass.
        file_shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    stored_names = set(file_shapes)
    problems = [f"missing tensor {n}" for n in sorted(set(want) - stored_names)]
    problems += [f"unexpected tensor {n}" for n in sorted(stored_names - set(want))]
    problems += [f"{n}: checkpoint {manifest['tensors'].get(n)}, expected {spec}"
                 for n, spec in sorted(want.items()) if n in stored_names and manifest["tensors"].get(n) != spec]
    problems += [f"{n}: {TENSORS_FILE} holds shape {file_shapes[n]}, expected {spec['shape']}"
                 for n, spec in sorted(want.items()) if n in stored_names and file_shapes[n] != spec["shape"]]
    if problems:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not fit this run's state:\n  " + "\n  ".join(problems[:20])
            + "\nResume with the same model, --rank, --targets and optimizer, or start fresh with a new --out.")


def restore_checkpoint(path: str | os.PathLike, template: TrainState,
                       run_config: Mapping[str, Any]) -> TrainState:
    """Loads a checkpoint after validating it against ``run_config`` and ``template``.

    Nothing is built until the manifest, the run config and every tensor name, shape and dtype
    have been checked, so a wrong checkpoint raises and leaves the caller's state untouched.

    Args:
        path: a checkpoint directory written by :func:`save_checkpoint`.
        template: a state with the expected structure (e.g. fresh ``init_lora``/``tx.init``);
            its ``step``, ``examples_seen``, ``losses`` and ``evals`` are ignored.
        run_config: the current run's settings; must equal the stored ones.

    Returns:
        The restored state, with ``jax.Array`` leaves.

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another run or another state layout.
    """
    path = Path(path)
    manifest = read_manifest(path)
    diff = _config_diff(manifest["run_config"], _json_roundtrip(run_config))
    if diff:
        raise CheckpointMismatchError(
            f"Checkpoint {path} was written by a run with different settings:\n  " + "\n  ".join(diff)
            + "\nRerun with the same flags to resume it, or pass a new --out to start a fresh run.")
    expected, treedefs = _named_leaves(template)
    _check_tensors(path, manifest, expected)
    with safe_open(path / TENSORS_FILE, framework="np") as f:
        loaded = {name: jnp.asarray(f.get_tensor(name)) for name in expected}
    trees = {}
    for prefix, treedef in treedefs.items():
        names = [n for n in expected if n == prefix or n.startswith(prefix + ".")]
        trees[prefix] = jax.tree_util.tree_unflatten(treedef, [loaded[n] for n in names])
    key = trees["rng_key"]
    if _is_typed_key(template.rng_key):
        key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(template.rng_key))
    return TrainState(step=int(manifest["step"]), adapter=trees["adapter"], opt_state=trees["opt_state"],
                      rng_key=key, examples_seen=int(manifest["examples_seen"]),
                      losses=tuple(float(x) for x in manifest["losses"]),
                      evals=tuple((int(s), float(v)) for s, v in manifest["evals"]))
