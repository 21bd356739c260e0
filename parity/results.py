"""Result rows of a parity check and the comparisons that produce them.

Every check ends in one or more :class:`CheckResult` rows: a name, the largest
absolute and relative error, the tolerance it was held to and whether it passed.
The comparisons never raise on a mismatch (a shape or key mismatch is a failed
row that says what differs), so one broken stage cannot hide the others.

Relative error is *scale relative*: ``max|a - b| / max|b|``. Element-wise relative
errors explode wherever the reference crosses zero (logits, gradients and LoRA
deltas all do), so they would fail correct code; dividing by the reference's
largest magnitude measures the error against the size of the signal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """Bounds a check must meet; ``None`` means that bound is not checked.

    Attributes:
        atol: Largest allowed ``max|a - b|``.
        rtol: Largest allowed ``max|a - b| / max|b|``.
        why: One line saying where the bound comes from (printed in reports).

    >>> Tolerance(atol=0.0).describe()
    'abs<=0'
    >>> Tolerance(atol=1e-5, rtol=2e-6).describe()
    'abs<=1e-05 rel<=2e-06'
    """

    atol: float | None = None
    rtol: float | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.atol is None and self.rtol is None:
            raise ValueError("Tolerance needs atol, rtol or both; got neither.")
        for label, value in (("atol", self.atol), ("rtol", self.rtol)):
            if value is not None and not value >= 0:
                raise ValueError(f"Tolerance {label} must be >= 0, got {value!r}.")

    def admits(self, max_abs: float, max_rel: float) -> bool:
        """True when both stated bounds hold (NaN never passes)."""
        abs_ok = self.atol is None or max_abs <= self.atol
        rel_ok = self.rtol is None or max_rel <= self.rtol
        return bool(abs_ok and rel_ok)

    def describe(self) -> str:
        """A short human form such as ``abs<=1e-05 rel<=2e-06``."""
        parts = []
        if self.atol is not None:
            parts.append(f"abs<={self.atol:g}")
        if self.rtol is not None:
            parts.append(f"rel<={self.rtol:g}")
        return " ".join(parts)


EXACT = Tolerance(atol=0.0, why="integer or set outcome: must be identical")


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """One row of a parity report.

    Attributes:
        stage: The pipeline stage (``base_forward``, ``injection``, ...).
        name: What was compared, e.g. ``"logits [c_attn r=4]"``.
        max_abs: Largest absolute difference (NaN when it could not be measured).
        max_rel: Largest difference relative to the reference's largest magnitude.
        tolerance: The bound it was held to.
        passed: Whether it met the bound.
        detail: Where the worst error sits, or why the row failed.
    """

    stage: str
    name: str
    max_abs: float
    max_rel: float
    tolerance: Tolerance
    passed: bool
    detail: str = ""

    def as_dict(self) -> dict:
        """A JSON-ready dict (NaN becomes ``None``)."""
        return {
            "stage": self.stage,
            "name": self.name,
            "max_abs": _finite_or_none(self.max_abs),
            "max_rel": _finite_or_none(self.max_rel),
            "atol": self.tolerance.atol,
            "rtol": self.tolerance.rtol,
            "tolerance": self.tolerance.describe(),
            "passed": self.passed,
            "detail": self.detail,
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def failed(stage: str, name: str, tolerance: Tolerance, reason: str) -> CheckResult:
    """A row that failed before anything could be measured.

    >>> failed("merge", "weights", EXACT, "B is zero").passed
    False
    """
    nan = float("nan")
    return CheckResult(stage=stage, name=name, max_abs=nan, max_rel=nan, tolerance=tolerance,
                       passed=False, detail=reason)


def array_errors(actual, expected) -> tuple[float, float]:
    """``(max|a - b|, max|a - b| / max|b|)`` in float64, for equal shapes.

    >>> array_errors(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
    (2.0, 0.5)
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    if scale == 0.0:
        # A zero reference has no scale: identical arrays are exact, anything else is infinitely off.
        return max_abs, (0.0 if max_abs == 0.0 else float("inf"))
    return max_abs, max_abs / scale


def compare_arrays(stage: str, name: str, actual, expected, tolerance: Tolerance,
                   detail: str = "") -> CheckResult:
    """Compares two arrays; a shape mismatch or a NaN is a failed row, not an exception.

    >>> row = compare_arrays("base_forward", "logits", np.ones(3), np.ones(3), Tolerance(atol=1e-6))
    >>> row.passed, row.max_abs
    (True, 0.0)
    >>> compare_arrays("merge", "w", np.ones((2, 3)), np.ones((3, 2)), EXACT).detail
    'shape (2, 3) != expected (3, 2)'
    """
    a, b = np.asarray(actual), np.asarray(expected)
    if a.shape != b.shape:
        return failed(stage, name, tolerance, f"shape {a.shape} != expected {b.shape}")
    max_abs, max_rel = array_errors(a, b)
    if np.isnan(max_abs):
        return failed(stage, name, tolerance, "NaN in the compared values")
    return CheckResult(stage=stage, name=name, max_abs=max_abs, max_rel=max_rel, tolerance=tolerance,
                       passed=tolerance.admits(max_abs, max_rel), detail=detail)


def compare_named_arrays(stage: str, name: str, actual: Mapping, expected: Mapping,
                         tolerance: Tolerance) -> CheckResult:
    """Compares two ``name -> array`` mappings key by key; the row reports the worst key.

    The relative error is taken per key (each tensor against its own scale) and the
    largest one is reported, so one tiny tensor cannot hide behind a large one.

    >>> ref = {"a": np.ones(2), "b": np.full(2, 10.0)}
    >>> row = compare_named_arrays("grads", "all", {"a": np.ones(2), "b": np.full(2, 11.0)}, ref,
    ...                            Tolerance(rtol=0.05))
    >>> row.passed, row.max_rel, row.detail
    (False, 0.1, 'worst: b')
    >>> compare_named_arrays("grads", "all", {"a": np.ones(2)}, ref, EXACT).detail
    'keys differ: missing b'
    """
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else [])
        return failed(stage, name, tolerance, "keys differ: " + "; ".join(parts))
    worst_key, worst_abs, worst_rel = "", 0.0, 0.0
    for key in sorted(expected):
        a, b = np.asarray(actual[key]), np.asarray(expected[key])
        if a.shape != b.shape:
            return failed(stage, name, tolerance, f"{key}: shape {a.shape} != expected {b.shape}")
        key_abs, key_rel = array_errors(a, b)
        if np.isnan(key_abs):
            return failed(stage, name, tolerance, f"{key}: NaN in the compared values")
        worst_abs = max(worst_abs, key_abs)
        if key_rel >= worst_rel:
            worst_key, worst_rel = key, key_rel
    return CheckResult(stage=stage, name=name, max_abs=worst_abs, max_rel=worst_rel, tolerance=tolerance,
                       passed=tolerance.admits(worst_abs, worst_rel), detail=f"worst: {worst_key}")


def compare_exact(stage: str, name: str, actual, expected) -> CheckResult:
    """Integer or set outcomes: the error is the count (or number of items) that differ.

    >>> compare_exact("injection", "trainable params", 800, 811).max_abs
    11.0
    >>> row = compare_exact("injection", "modules", {"h.0.attn"}, {"h.0.attn", "h.1.attn"})
    >>> row.passed, row.detail
    (False, 'only in reference: h.1.attn')
    """
    if isinstance(expected, (set, frozenset)):
        only_actual, only_expected = sorted(set(actual) - expected), sorted(expected - set(actual))
        n_diff = float(len(only_actual) + len(only_expected))
        parts = ([f"only in reference: {', '.join(only_expected)}"] if only_expected else []) + (
            [f"only in candidate: {', '.join(only_actual)}"] if only_actual else [])
        detail = "; ".join(parts) or f"{len(expected)} identical"
        rel = n_diff / max(len(expected), 1)
    else:
        n_diff = float(abs(actual - expected))
        detail = f"{actual} vs {expected}"
        rel = n_diff / max(abs(expected), 1)
    return CheckResult(stage=stage, name=name, max_abs=n_diff, max_rel=rel, tolerance=EXACT,
                       passed=n_diff == 0.0, detail=detail)


@dataclass(frozen=True)
class StageResult:
    """What one check returns: its rows, plus the arrays it computed (for ``--dump``).

    Attributes:
        rows: The rows, in order.
        arrays: Named float32 arrays, e.g. ``{"torch_base_logits": ...}``; may be empty.
    """

    rows: list[CheckResult]
    arrays: dict = field(default_factory=dict)
