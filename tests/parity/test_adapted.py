"""The B != 0 guard row: its numbers, verdict and message."""

from __future__ import annotations

import numpy as np

from parity.adapted import nonzero_b_row
from parity.transfer import named_to_jax_lora


def test_nonzero_b_row_counts_zero_b_modules():
    a = np.ones((4, 2), np.float32)
    lora = named_to_jax_lora({"h.0.c_attn": (a, np.zeros((2, 4), np.float32)),
                              "h.1.c_attn": (a, np.ones((2, 4), np.float32))})
    row = nonzero_b_row("merge", lora)
    assert (row.passed, row.max_abs, row.max_rel, row.tolerance.atol) == (False, 1.0, 1.0, 0.0)
    assert row.detail.startswith("B == 0 in 1/2 modules (e.g. h.0.c_attn)")


def test_nonzero_b_row_passes_when_every_b_is_nonzero():
    lora = named_to_jax_lora({"h.0.c_attn": (np.ones((4, 2), np.float32), np.ones((2, 4), np.float32))})
    row = nonzero_b_row("merge", lora)
    assert (row.passed, row.max_abs, row.max_rel, row.detail) == (True, 0.0, 0.0, "1 modules, all B != 0")
