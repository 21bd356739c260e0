"""Stage 3: the same non-zero A and B change the logits by the same amount in both halves."""

from __future__ import annotations

import numpy as np

from parity.adapted import AdaptedPair, nonzero_b_row
from parity.results import StageResult, compare_arrays
from parity.tolerances import tolerance_for


def check_forward_delta(adapted: AdaptedPair, input_ids: np.ndarray, label: str = "") -> StageResult:
    """Compares LoRA logits, and the deltas ``logits_lora - logits_base``, across the halves.

    The delta row is the sharp one: a scaling mistake (alpha instead of alpha/r) moves
    the delta by a factor r while moving the logits by much less.
    """
    pair, suffix = adapted.pair, f" [{label}]" if label else ""
    torch_base = pair.torch_logits(pair.torch_model, input_ids)
    jax_base = pair.jax_logits(input_ids)
    torch_lora = pair.torch_logits(adapted.torch_model, input_ids)
    jax_lora = pair.jax_logits(input_ids, adapter=adapted.adapter)
    rows = [
        nonzero_b_row("forward_delta", adapted.adapter),
        compare_arrays("forward_delta", f"LoRA logits torch vs JAX{suffix}", torch_lora, jax_lora,
                       tolerance_for("logits", pair.dtype)),
        compare_arrays("forward_delta", f"delta (lora - base) torch vs JAX{suffix}", torch_lora - torch_base,
                       jax_lora - jax_base, tolerance_for("delta", pair.dtype),
                       detail=f"max |delta| {np.abs(jax_lora - jax_base).max():.3g}"),
    ]
    return StageResult(rows, {"torch_lora_logits": torch_lora, "jax_lora_logits": jax_lora})
