"""Tokenised text to deterministic training batches with a resumable position.

A token stream is cut into windows of ``seq_len`` tokens that share one token at
each boundary (stride ``seq_len - 1``), so every token but the first is predicted
exactly once. Batches are ``lora_jax.Batch`` values, the one convention of the
library: the loss shifts inside (position ``t`` predicts token ``t + 1``). Each
epoch visits every window once in an order drawn from ``(seed, epoch)``.

The only state is ``examples_seen``, the number of windows consumed so far.
Batch contents are a pure function of it, so a run resumed from a checkpoint
that stored ``examples_seen`` sees exactly the batches an uninterrupted run
would have seen, and a batch of ``B * G`` rows equals ``G`` consecutive
micro-batches of ``B`` rows (what gradient accumulation relies on).

>>> import numpy as np
>>> sampler = WindowSampler(np.arange(9), seq_len=3, seed=0)
>>> sampler.num_windows
4
>>> batch = sampler.batch(examples_seen=0, batch_size=4)
>>> sorted(batch.input_ids[:, 0].tolist())
[0, 2, 4, 6]
>>> batch.input_ids.shape, batch.mask is None
((4, 3), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_jax.training.losses import Batch


def _check_token_ids(ids: np.ndarray, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of token ids, got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}; encode the text first.")
    return ids.astype(np.int32)


def _check_positive(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def split_heldout(ids: np.ndarray, heldout_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Splits one token stream into a training head and a held-out tail.

    The tail is contiguous (not sampled) so held-out text is never seen in training,
    not even as the context of a training window.

    Args:
        ids: 1-D integer token ids.
        heldout_fraction: share of tokens kept for evaluation, in (0, 1).

    Returns:
        ``(train_ids, heldout_ids)`` as int32 arrays.

    >>> train, heldout = split_heldout(np.arange(10), 0.2)
    >>> train.tolist(), heldout.tolist()
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    ids = _check_token_ids(ids, "ids")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    cut = len(ids) - max(1, int(round(len(ids) * heldout_fraction)))
    if cut < 1:
        raise ValueError(f"Only {len(ids)} tokens: too few to split off held-out text; supply more text.")
    return ids[:cut], ids[cut:]


def window_count(num_tokens: int, seq_len: int) -> int:
    """Number of ``seq_len``-token windows at stride ``seq_len - 1`` in ``num_tokens``.

    >>> window_count(9, 3), window_count(10, 3)
    (4, 4)
    """
    return max(0, (num_tokens - 1) // (seq_len - 1))


def _windows(ids: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    starts = window_ids * (seq_len - 1)
    return ids[starts[:, None] + np.arange(seq_len)[None, :]]  # (N, T)


def heldout_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """All evaluation windows of a token stream, in text order; each token is predicted once.

    Args:
        ids: 1-D integer token ids.
        seq_len: tokens per row (>= 2); a row yields ``seq_len - 1`` predictions.

    Returns:
        ``(N, seq_len)`` int32 token ids; neighbouring rows share their boundary token.

    >>> heldout_windows(np.arange(8), 3).tolist()
    [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    """
    ids = _check_token_ids(ids, "ids")
    _check_positive(seq_len, "seq_len", 2)
    n = window_count(len(ids), seq_len)
    if n == 0:
        raise ValueError(
            f"Held-out text has {len(ids)} tokens, fewer than seq_len = {seq_len}; "
            "use a shorter sequence length or more held-out text."
        )
    return _windows(ids, np.arange(n), seq_len)


@dataclass(frozen=True)
class WindowSampler:
    """Shuffled, epoch-based windows of one token stream, addressed by ``examples_seen``.

    Attributes:
        ids: 1-D integer token ids of the training text.
        seq_len: tokens per row (>= 2).
        seed: seeds the per-epoch window order.
    """

    ids: np.ndarray
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _check_token_ids(self.ids, "ids"))
        _check_positive(self.seq_len, "seq_len", 2)
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if self.num_windows == 0:
            raise ValueError(
                f"Training text has {len(self.ids)} tokens, fewer than seq_len = {self.seq_len}; "
                "use a shorter sequence length or more text."
            )

    @property
    def num_windows(self) -> int:
        """Windows per epoch."""
        return window_count(len(self.ids), self.seq_len)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them."""
        rng = np.random.default_rng((int(self.seed), int(epoch)))
        return rng.permutation(self.num_windows)

    def batch(self, examples_seen: int, batch_size: int) -> Batch:
        """The next ``batch_size`` windows after ``examples_seen`` have been consumed.

        A batch may straddle an epoch boundary; it then takes the end of one epoch's order
        and the start of the next.

        Returns:
            A ``Batch`` of ``(batch_size, seq_len)`` int32 ids, no mask.
        """
        _check_positive(batch_size, "batch_size")
        if examples_seen < 0:
            raise ValueError(f"examples_seen must be >= 0, got {examples_seen}.")
        flat = np.arange(examples_seen, examples_seen + batch_size)
        epochs, slots = np.divmod(flat, self.num_windows)
        orders = {int(e): self.epoch_order(e) for e in np.unique(epochs)}
        window_ids = np.array([orders[int(e)][s] for e, s in zip(epochs, slots)], dtype=np.int64)
        return Batch(_windows(self.ids, window_ids, self.seq_len))
