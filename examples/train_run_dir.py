"""The main job's ``--out`` directory: one run at a time, and a new run never destroys an old one early.

- Before any work the path is checked (a directory, writable) and locked: ``--out/.lock`` is held
  with ``fcntl.flock`` for the whole run, so a second run on the same ``--out`` exits 2 while the
  first one works. The kernel drops the lock when the process ends, even by SIGKILL.
- ``--resume`` continues from the newest *intact* checkpoint (digests verified): damaged newer ones
  are skipped with a warning that names them and the one used. ``--lr`` and ``--clip-norm`` may
  change on resume; the change is recorded in the checkpoint history with a note that the run is
  no longer bit-identical to an uninterrupted one. Every other setting must match (exit 2).
- A fresh run refuses an ``--out`` that already holds something, unless ``--overwrite``; ``--resume``
  continues what is there. With ``--overwrite`` the old run stays whole until the new run's first
  checkpoint is complete: that checkpoint is written into ``.checkpoints-next/``, which then
  replaces ``checkpoints/`` in one atomic exchange, and only then are the old ``adapter/``,
  ``results.json`` and ``loss.png`` removed. A run killed before that point leaves the old run as it was.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp()) / "run"
>>> with open_run_dir(out, resume=False, overwrite=False) as run_dir:
...     run_dir.replaces_old_run, sorted(p.name for p in out.iterdir())
(False, ['.lock'])
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # sibling modules when run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_jax.atomic_files import remove_stale_temps, replace_dir  # noqa: E402
from lora_jax.training.checkpoint import (TrainState, latest_intact_checkpoint, read_manifest,  # noqa: E402
                                          restore_checkpoint, save_checkpoint)
from train_guard import BadInput  # noqa: E402

LOCK_FILE = ".lock"
STAGING = ".checkpoints-next"
CHECKPOINTS = "checkpoints"
# Outputs of a finished run, removed once a new run has replaced its checkpoints.
FINAL_OUTPUTS = ("adapter", "results.json", "loss.png")
# Settings a resume may change: they shape the update, not the state, and Adam's moments carry over.
CHANGEABLE_ON_RESUME = ("lr", "clip_norm")
NOT_BIT_IDENTICAL = ("the run is no longer bit-identical to an uninterrupted one: from this step on the schedule's "
                     "peak learning rate or the gradient clip differ")


class RunDir:
    """A locked ``--out``; ``save(state, settings)`` writes checkpoints with the replace-old-run rule."""

    def __init__(self, out: Path, replaces_old_run: bool):
        self.out = out
        self.checkpoints = out / CHECKPOINTS
        self.replaces_old_run = replaces_old_run

    def save(self, state: TrainState, settings: Mapping[str, Any]) -> Path:
        """Saves a checkpoint; the first one of a fresh run over an old one swaps the whole root in."""
        if not self.replaces_old_run:
            return save_checkpoint(self.checkpoints, state, settings)
        staging = self.out / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        path = save_checkpoint(staging, state, settings)
        replace_dir(staging, self.checkpoints)  # the old checkpoints go only now, in the same step
        for name in FINAL_OUTPUTS:
            old = self.out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        self.replaces_old_run = False
        return self.checkpoints / path.name


def _check_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; pass a directory (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"--out {out} cannot be created ({err.strerror}); pass a directory you can write to.") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out} is not writable; pass a directory you can write to.")


def _lock(out: Path) -> int:
    handle = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        owner = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(handle)
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise BadInput(f"--out {out} is in use by another run (pid {owner}); wait for it to finish, or pass "
                           "another --out.") from None
        raise
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    return handle


def _contents(out: Path) -> list[str]:
    return sorted(e for e in os.listdir(out) if e not in (LOCK_FILE, STAGING))


@contextlib.contextmanager
def open_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Iterator[RunDir]:
    """Checks and locks ``out``, applies the fresh/overwrite/resume rule, and yields the ``RunDir``.

    Raises:
        BadInput: ``out`` is a file, not writable, locked by another run, or (fresh run without
            ``overwrite``) not empty.
    """
    out = Path(out)
    _check_path(out)
    handle = _lock(out)
    try:
        # We hold the lock, so no other writer is alive here: leftovers are from killed runs.
        shutil.rmtree(out / STAGING, ignore_errors=True)
        remove_stale_temps(out)
        contents = _contents(out)
        if contents and not (resume or overwrite):
            raise BadInput(f"--out {out} already holds {', '.join(contents[:4])}{' ...' if len(contents) > 4 else ''}; "
                           "pass --resume to continue that run, --overwrite to replace it, or a new --out.")
        has_checkpoints = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir())
        if resume and contents and not has_checkpoints:
            raise BadInput(f"--out {out} holds no checkpoints to resume from, but other files "
                           f"({', '.join(contents[:4])}); pass --overwrite to start a fresh run there, or a new --out.")
        yield RunDir(out, replaces_old_run=bool(contents) and not resume)
    finally:
        os.close(handle)  # releases the flock; the file stays so a waiting opener never locks a removed inode


def start_state(args, run_dir: RunDir, fresh: TrainState, settings: Mapping[str, Any], evaluate) -> TrainState:
    """The newest intact checkpoint with ``--resume``, else ``fresh`` with the base model's step-0 evaluation.

    Raises:
        BadInput: ``--resume`` and every checkpoint is damaged.
        CheckpointMismatchError: the checkpoint belongs to a run with other settings.
    """
    if args.resume:
        found = latest_intact_checkpoint(run_dir.checkpoints)
        damaged = [path.name for path, _ in found.damaged]  # each one's reason is logged by the library
        if found.path is None and damaged:
            raise BadInput(f"every checkpoint in {run_dir.checkpoints} is damaged ({', '.join(damaged)}); pass "
                           "--overwrite to start a fresh run there, or a new --out.")
        if found.path is not None:
            state = restore_checkpoint(found.path, fresh, settings, may_differ=CHANGEABLE_ON_RESUME)
            stored = read_manifest(found.path)["run_config"]
            record: dict[str, Any] = {"event": "resume", "step": state.step, "from": found.path.name}
            if damaged:
                record["skipped_damaged"] = damaged
                print(f"warning: resuming from {found.path.name} instead of the damaged {', '.join(damaged)}",
                      file=sys.stderr)
            changed = {k: [stored.get(k), settings[k]] for k in CHANGEABLE_ON_RESUME if stored.get(k) != settings[k]}
            if changed:
                record.update(changed=changed, note=NOT_BIT_IDENTICAL)
                flags = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items())
                print(f"note: {flags} at step {state.step}; {NOT_BIT_IDENTICAL}.")
            print(f"resumed from {found.path} (step {state.step})")
            return state._replace(history=state.history + (record,))
        print(f"no checkpoint under {run_dir.checkpoints}; starting fresh")
    start = {"event": "start", "step": 0}
    return fresh._replace(evals=((0, evaluate(fresh.adapter)),), history=(start,))  # B = 0: exactly the base
