"""What the main job refuses, and the exit code each refusal gets.

Exit codes, the same across the project's tools:

- 0: done.
- 1: a numerical check failed (the merged model does not reproduce the adapter's held-out loss).
- 2: bad input (flags, files, a checkpoint of another run, an ``--out`` in use): one line that names
  the problem and the fix, no traceback, raised as :class:`BadInput` where the input is read.
- 3: divergence (:class:`Diverged`): a non-finite training loss, gradient norm, parameter,
  optimizer state or held-out loss. Nothing from that step is saved.

Anything else is a bug and keeps its traceback: only errors known to come from bad input are
turned into :class:`BadInput`, at the call that reads the input.

>>> import argparse
>>> check_args(argparse.Namespace(rank=8, steps=10, batch_size=2, seq_len=16, grad_accum=1, eval_every=5,
...     ckpt_every=5, warmup=0, lr=float("nan"), alpha=16.0, dropout=0.0, weight_decay=0.0, clip_norm=1.0, data=None))
['--lr must be a finite number > 0, got nan']
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3


class BadInput(Exception):
    """Input the job cannot use; the message names the problem and the fix in one line (exit 2)."""


class Diverged(Exception):
    """Training produced a non-finite value at ``step`` (exit 3)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}")
        self.step, self.what = step, what
        self.checkpoint = None  # the newest good checkpoint of this run, filled in by the caller that knows it


class CheckFailed(Exception):
    """A numerical check of the finished run failed (exit 1)."""


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_POSITIVE_INTS = ("rank", "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "ckpt_every")
# flag: (lowest allowed, whether the lowest is allowed); every float flag must also be finite.
_FLOAT_RANGES = {"lr": (0.0, False), "alpha": (0.0, False), "clip_norm": (0.0, False), "weight_decay": (0.0, True),
                 "dropout": (0.0, True)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags, as messages that name the flag; empty when all is well."""
    problems = [f"{_flag(n)} must be >= 1, got {getattr(args, n)}" for n in _POSITIVE_INTS if getattr(args, n) < 1]
    for name, (low, inclusive) in _FLOAT_RANGES.items():
        value = getattr(args, name)
        # Finite in float32 too, the dtype the optimizer computes in: 1e39 would be inf there.
        if not abs(value) <= _FLOAT32_MAX or value < low or (value == low and not inclusive):
            problems.append(f"{_flag(name)} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")
    if math.isfinite(args.dropout) and args.dropout >= 1.0:
        problems.append(f"--dropout must be < 1, got {args.dropout}")
    if not 0 <= args.warmup < args.steps:
        problems.append(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.data is not None and not args.data.is_file():
        problems.append(f"--data {args.data} is not a file")
    return problems


def read_text(path: Path) -> str:
    """The UTF-8 text of ``--data``; a binary or non-UTF-8 file is bad input that names the file.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "w.bin"
    >>> _ = bad.write_bytes(b"ok\\xff\\x00")
    >>> try:
    ...     read_text(bad)
    ... except BadInput as err:
    ...     print(err)  # doctest: +ELLIPSIS
    --data .../w.bin is not UTF-8 text (byte 0xff at offset 2); pass a UTF-8 text file.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"--data {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                       "pass a UTF-8 text file.") from None
    if not text.strip():
        raise BadInput(f"--data {path} holds no text; pass a file with the text to fine-tune on.")
    return text


def check_vocab(model_dir: Path, model_vocab: int, tokenizer_vocab: int, *token_streams: np.ndarray) -> None:
    """The tokenizer must only produce ids the model has rows for (else the loss is NaN, not a bad lr)."""
    top = max((int(ids.max()) for ids in token_streams if ids.size), default=-1)
    if tokenizer_vocab > model_vocab or top >= model_vocab:
        raise BadInput(
            f"--model {model_dir}: the tokenizer has {tokenizer_vocab} tokens (largest id in the text {top}) but the "
            f"model's vocab_size is {model_vocab}; they do not belong together. Pass a directory whose "
            "tokenizer.json was made for its config.json.")


@jax.jit
def all_finite(*trees: Any) -> jax.Array:
    """True when every float leaf of ``trees`` is finite (integer leaves, such as step counts, are skipped).

    >>> bool(all_finite({"a": jnp.ones(2)}, (jnp.zeros((), jnp.int32),))), bool(all_finite([jnp.array([1.0, jnp.nan])]))
    (True, False)
    """
    leaves = [x for x in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
