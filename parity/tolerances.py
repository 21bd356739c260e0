"""Tolerance per check and per dtype, with the reason for each bound.

Relative errors are scale relative (``max|a-b| / max|b|``, see :mod:`parity.results`).
fp32 bounds come from float32 rounding (unit roundoff 6e-8) grown by reduction
order: the two frameworks sum matmuls, softmax and LayerNorm in different orders,
so each layer adds ~1e-7 relative noise; a few layers and a 1e2-1e3 vocabulary stay
below 1e-5 with room to spare. Each bound sits 5-10x above what correct code
measures on CPU (docs/parity.md lists the measurements) and orders of magnitude
below what the planted bugs in tests/parity produce.

bf16 bounds: bfloat16 keeps 8 mantissa bits (unit roundoff 3.9e-3), and the two
frameworks cast at different points (torch autocast keeps LayerNorm and softmax in
fp32, Flax computes them on bf16 inputs), so logits agree to a few percent of
their scale. Weights stay float32 in both halves in bf16 mode, so merges are held
to float32 bounds.

The rows against PEFT (``parity.peft_reference``) use the same kinds: PEFT runs the same
transformers GPT-2 as ``lora_torch`` with the same values, so PEFT vs JAX has the sources of
rounding torch vs JAX has. DoRA adds one float32 column norm per layer (~1e-7 relative), within
every bound (docs/parity.md lists the measurements).
"""

from __future__ import annotations

from parity.numerics import check_dtype
from parity.results import Tolerance

# Kinds of comparison; every check names one of these.
KINDS = ("logits", "delta", "grads", "train_loss", "train_update", "merged_weights", "dora_merged_weights",
         "merge_logits", "unmerge", "interchange_logits")

# DoRA's merge scales each kernel column by m / ||W0 + sAB||. The frameworks sum the `in` squares of that
# norm in different orders, and the norm's relative rounding (pairwise ~log2(in) * 6e-8, a random walk
# ~sqrt(in) * 6e-8 = 3e-6 at GPT-2 small's in = 3072) multiplies the whole column.
_DORA_MERGE_WHY = "column scale m/||W0+sAB||: the norm's sum of `in` squares rounds in another order per framework"

_FP32 = {
    "logits": Tolerance(rtol=1e-5, why="fp32 reduction-order noise through every layer"),
    "delta": Tolerance(rtol=1e-4, why="delta = difference of two logits: base rounding over a smaller scale"),
    "grads": Tolerance(rtol=1e-4, why="backward doubles the reduction depth of the forward"),
    "train_loss": Tolerance(rtol=1e-5, why="per-step loss, same as logits noise averaged"),
    "train_update": Tolerance(
        rtol=2e-2,
        why="Adam divides by sqrt(v)+eps: for |g| near eps a 1e-6 grad difference moves m/sqrt(v) by O(1)"),
    "merged_weights": Tolerance(rtol=1e-6, why="one fp32 A@B in each framework, same operands"),
    "dora_merged_weights": Tolerance(rtol=5e-6, why=_DORA_MERGE_WHY),
    "merge_logits": Tolerance(rtol=1e-5, why="x(W0+sAB) vs xW0+s(xA)B: same sums, regrouped"),
    "unmerge": Tolerance(rtol=1e-6, why="(W0+sAB)-sAB returns W0 up to one rounding of W, relative to max|W|"),
    "interchange_logits": Tolerance(rtol=1e-5, why="adapter round trip is lossless fp32; logits noise"),
}

_BF16 = {
    "logits": Tolerance(rtol=5e-2, why="bf16 unit roundoff 3.9e-3, different cast points per framework"),
    "delta": Tolerance(rtol=2e-1, why="delta is a difference of two bf16 logits; noise over a smaller scale"),
    "grads": Tolerance(rtol=2e-1, why="bf16 backward through every layer"),
    "train_loss": Tolerance(rtol=2e-2, why="mean of bf16 per-token losses"),
    "train_update": Tolerance(rtol=5e-1, why="Adam normalises bf16 gradient noise to O(lr) per element"),
    "merged_weights": Tolerance(rtol=1e-6, why="weights and LoRA params stay fp32 in bf16 mode"),
    "dora_merged_weights": Tolerance(rtol=5e-6, why="weights stay fp32 in bf16 mode; " + _DORA_MERGE_WHY),
    "merge_logits": Tolerance(rtol=5e-2, why="bf16 rounding of x(W0+sAB) vs xW0+s(xA)B"),
    "unmerge": Tolerance(rtol=1e-6, why="weights stay fp32 in bf16 mode"),
    "interchange_logits": Tolerance(rtol=5e-2, why="bf16 logits noise"),
}

TOLERANCES: dict[str, dict[str, Tolerance]] = {"fp32": _FP32, "bf16": _BF16}


def tolerance_for(kind: str, dtype: str = "fp32") -> Tolerance:
    """The tolerance of one kind of comparison at one dtype.

    Args:
        kind: One of :data:`KINDS`.
        dtype: ``"fp32"`` or ``"bf16"``.

    >>> tolerance_for("logits").describe()
    'rel<=1e-05'
    >>> tolerance_for("logit")
    Traceback (most recent call last):
    ...
    ValueError: Unknown tolerance kind 'logit'; known kinds: logits, delta, grads, train_loss, train_update, merged_weights, dora_merged_weights, merge_logits, unmerge, interchange_logits.
    """
    check_dtype(dtype)
    if kind not in KINDS:
        raise ValueError(f"Unknown tolerance kind {kind!r}; known kinds: {', '.join(KINDS)}.")
    return TOLERANCES[dtype][kind]
