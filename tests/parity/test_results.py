"""Comparisons never raise on a mismatch: they return a failed row that says what differs."""

from __future__ import annotations

import numpy as np
import pytest

from parity.results import EXACT, Tolerance, array_errors, compare_arrays, compare_exact, compare_named_arrays


def test_relative_error_is_scale_relative_not_elementwise():
    # Element-wise, 1e-6 off a reference of 1e-9 would be 1000x; against the scale (1.0) it is 1e-6.
    max_abs, max_rel = array_errors(np.array([1e-9 + 1e-6, 1.0]), np.array([1e-9, 1.0]))
    assert max_abs == pytest.approx(1e-6) and max_rel == pytest.approx(1e-6)


def test_zero_reference_is_exact_or_infinitely_off():
    assert array_errors(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    assert array_errors(np.ones(3), np.zeros(3)) == (1.0, float("inf"))


def test_nan_fails_with_its_reason():
    row = compare_arrays("s", "n", np.array([np.nan]), np.array([1.0]), Tolerance(rtol=1.0))
    assert not row.passed and row.detail == "NaN in the compared values"


def test_both_bounds_must_hold():
    tol = Tolerance(atol=1e-3, rtol=1e-6)
    assert not compare_arrays("s", "n", np.array([1.0001]), np.array([1.0]), tol).passed  # rel 1e-4 > 1e-6


def test_named_comparison_reports_shape_mismatch_per_key():
    row = compare_named_arrays("s", "n", {"a": np.zeros((2, 3))}, {"a": np.zeros((3, 2))}, EXACT)
    assert not row.passed and row.detail == "a: shape (2, 3) != expected (3, 2)"


def test_exact_count_row():
    row = compare_exact("injection", "params", 811008, 811008)
    assert row.passed and row.max_abs == 0.0 and row.detail == "811008 vs 811008"


def test_tolerance_needs_a_bound():
    with pytest.raises(ValueError, match="needs atol, rtol or both"):
        Tolerance()
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        Tolerance(rtol=-1.0)


def test_json_row_writes_nan_as_null():
    row = compare_arrays("s", "n", np.array([np.nan]), np.array([1.0]), Tolerance(rtol=1.0))
    assert row.as_dict()["max_abs"] is None and row.as_dict()["passed"] is False
