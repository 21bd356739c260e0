"""Weighted combinations of LoRA adapters (PEFT's ``add_weighted_adapter``), exact where PEFT is not.

Both halves hand their factors here as NumPy arrays in this project's layout, A (in, r) and
B (r, out), with each module's scaling ``s``; the combination is computed in float64 and each half
casts the result back. Every combined adapter has one rank ``r'`` for all its modules, lora_alpha
``r'`` and no rsLoRA, so its scaling is exactly 1 and the weights ``w_i s_i`` are folded into the
factors. The target modules are the union of the inputs'; a module an input does not adapt gets
nothing from it, and unused rows are zero, as in PEFT.

- ``cat``: ``A' = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` (columns), ``B' = [B_1; B_2; ...]`` (rows),
  ``r' = sum_i r_i``. Exact: ``A' B' = sum_i w_i s_i A_i B_i`` for any ranks, alphas and rsLoRA.
  PEFT builds the same tensors (its ``A`` carries ``w_i s_i``), but gives the new adapter
  ``lora_alpha = r'`` with the *first* adapter's ``use_rslora``: with rsLoRA its scaling is
  ``sqrt(r')``, not 1, so PEFT's combined delta is ``sqrt(r')`` times too large (PEFT issue 3761).
  Here the combined adapter never uses rsLoRA.
- ``linear``: ``A' = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B' = sum_i sqrt|w_i s_i| B_i``, all ranks
  equal. PEFT's definition: a weighted sum of the *factors*, whose product has cross terms
  ``A_i B_j``, so it is not the weighted sum of the deltas unless one adapter is combined. Matches
  PEFT's tensors; its scaling is 1 here where PEFT's is ``sqrt(r)`` with rsLoRA.
- ``svd``: the best rank-``k`` approximation (Eckart-Young) of ``D = sum_i w_i s_i A_i B_i``:
  ``A' = V_k`` (in, k), ``B' = S_k U_k^T`` (k, out) from the SVD of ``D^T`` (out, in), as PEFT orders it;
  ``k = svd_rank`` or the largest input rank. A module with ``min(in, out) < k`` pads zero rows.

Example:
    >>> import numpy as np
    >>> one = {"m": Factors(np.ones((3, 1)), np.full((1, 2), 2.0), 0.5)}
    >>> two = {"m": Factors(np.ones((3, 2)), np.ones((2, 2)), 1.0)}
    >>> rank, modules = combine_adapters("cat", [one, two], [1.0, -1.0])
    >>> rank, modules["m"].a.shape, (modules["m"].a @ modules["m"].b).tolist()[0]
    (3, (3, 3), [-1.0, -1.0])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

COMBINATION_TYPES = ("cat", "linear", "svd")


@dataclasses.dataclass(frozen=True)
class Factors:
    """One module of one adapter: ``a`` (in, r), ``b`` (r, out) and its scaling ``s``."""

    a: np.ndarray
    b: np.ndarray
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def delta(self) -> np.ndarray:
        """``s A B`` in float64, (in, out)."""
        return self.scaling * (np.asarray(self.a, np.float64) @ np.asarray(self.b, np.float64))


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """The weights as floats, after checking there is one finite weight per adapter.

    >>> check_weights([0.5, float("nan")], 2)
    Traceback (most recent call last):
    ...
    ValueError: combination weights must be finite numbers, got [0.5, nan]; give one finite weight per adapter.
    """
    values = list(weights)
    if len(values) != count:
        raise ValueError(f"got {len(values)} combination weights for {count} adapters; give one weight per adapter.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in values):
        raise ValueError(f"combination weights must be finite numbers, got {values}; give one finite weight per "
                         "adapter.")
    return [float(w) for w in values]


def combined_rank(combination_type: str, ranks: Sequence[int], svd_rank: int | None = None) -> int:
    """The rank ``r'`` of the combined adapter, from each input adapter's (largest) rank.

    >>> combined_rank("cat", [4, 2]), combined_rank("svd", [4, 2]), combined_rank("svd", [4, 2], 3)
    (6, 4, 3)

    Raises:
        ValueError: An unknown type, ``linear`` with unequal ranks, or a bad ``svd_rank``.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {COMBINATION_TYPES}.")
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' sums the factors, so every adapter needs the same rank, got "
                             f"ranks {list(ranks)}; use 'cat' (exact, rank = sum) or 'svd' (rank svd_rank).")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int or None (the largest input rank), got {svd_rank!r}.")
    return svd_rank or max(ranks)


def _check_shapes(adapters: Sequence[Mapping[str, Factors]]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for index, adapter in enumerate(adapters):
        for name, factors in adapter.items():
            shape = (int(factors.a.shape[0]), int(factors.b.shape[1]))
            if factors.a.shape[1] != factors.b.shape[0]:
                raise ValueError(f"adapter {index}, module {name!r}: A {factors.a.shape} and B {factors.b.shape} "
                                 "have different ranks.")
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"module {name!r} has (in, out) {shapes[name]} in one adapter and {shape} in "
                                 f"adapter {index}: the adapters were made for different base models.")
    return shapes


def _padded(a: np.ndarray, b: np.ndarray, rank: int) -> Factors:
    used = a.shape[1]
    a_out = np.zeros((a.shape[0], rank))
    b_out = np.zeros((rank, b.shape[1]))
    a_out[:, :used], b_out[:used] = a, b
    return Factors(a_out, b_out, 1.0)


def _cat(parts: Sequence[tuple[float, Factors]], rank: int) -> Factors:
    a = np.concatenate([w * f.scaling * np.asarray(f.a, np.float64) for w, f in parts], axis=1)
    b = np.concatenate([np.asarray(f.b, np.float64) for _, f in parts], axis=0)
    return _padded(a, b, rank)


def _linear(parts: Sequence[tuple[float, Factors]], rank: int) -> Factors:
    a = sum(math.copysign(math.sqrt(abs(w * f.scaling)), w * f.scaling) * np.asarray(f.a, np.float64) for w, f in parts)
    b = sum(math.sqrt(abs(w * f.scaling)) * np.asarray(f.b, np.float64) for w, f in parts)
    return _padded(a, b, rank)


def _svd(parts: Sequence[tuple[float, Factors]], rank: int) -> Factors:
    delta = sum(w * f.delta() for w, f in parts)  # (in, out)
    u, s, vh = np.linalg.svd(delta.T, full_matrices=False)  # PEFT's orientation: (out, in)
    k = min(rank, s.shape[0])
    return _padded(vh[:k].T, (u[:, :k] * s[:k]).T, rank)


_COMBINE = {"cat": _cat, "linear": _linear, "svd": _svd}


def combine_adapters(
    combination_type: str,
    adapters: Sequence[Mapping[str, Factors]],
    weights: Sequence[float],
    svd_rank: int | None = None,
) -> tuple[int, dict[str, Factors]]:
    """Combines adapters ``{module name: Factors}`` into one of scaling 1: ``(rank, {name: Factors})``.

    Args:
        combination_type: ``"cat"``, ``"linear"`` or ``"svd"`` (module docstring).
        adapters: The inputs, at least one; each maps dotted module names to their factors.
        weights: One finite weight per adapter (negative subtracts).
        svd_rank: The rank of an ``svd`` combination; default the largest input rank.

    Returns:
        The combined rank and float64 factors for the union of the modules, sorted by name.

    Raises:
        ValueError: No adapter, bad weights, an unknown type, unequal ranks for ``linear``, or a module
            whose shape differs between adapters. Raised before anything is computed.
    """
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter.")
    weights = check_weights(weights, len(adapters))
    shapes = _check_shapes(adapters)
    ranks = [max(f.rank for f in adapter.values()) for adapter in adapters]
    kind = "linear" if len(adapters) == 1 and combination_type in COMBINATION_TYPES else combination_type  # as PEFT
    rank = combined_rank(kind, ranks, svd_rank)
    if kind == "linear":
        uneven = sorted(name for name in shapes
                        if len({a[name].rank for a in adapters if name in a}) > 1)
        if uneven:
            raise ValueError(f"combination_type 'linear' needs equal ranks in every module; {uneven[:4]} differ.")
    combined = {}
    for name in sorted(shapes):
        parts = [(w, adapter[name]) for w, adapter in zip(weights, adapters) if name in adapter]
        combined[name] = _COMBINE[kind](parts, rank)
    return rank, combined
