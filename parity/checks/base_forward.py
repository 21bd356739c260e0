"""Stage 1: the base models, before any LoRA, give the same logits."""

from __future__ import annotations

import numpy as np

from parity.pair import ModelPair
from parity.results import StageResult, compare_arrays
from parity.tolerances import tolerance_for


def check_base_forward(pair: ModelPair, input_ids: np.ndarray) -> StageResult:
    """Compares transformers' logits with the Flax GPT-2's on one batch.

    A loader that forgets to tie ``lm_head`` to ``wte``, drops a bias or misses a
    transpose fails here, before LoRA is involved. With a 4-bit pair, JAX is also held to transformers'
    own 4-bit model, the base of the PEFT rows.
    """
    tolerance = tolerance_for("logits", pair.dtype)
    torch_logits = pair.torch_logits(pair.torch_model, input_ids)
    jax_logits = pair.jax_logits(input_ids)
    rows = [compare_arrays("base_forward", "logits torch vs JAX", torch_logits, jax_logits, tolerance)]
    if pair.reference_model is not None:
        rows.append(compare_arrays("base_forward", "logits transformers 4-bit (PEFT's base) vs JAX",
                                   pair.torch_logits(pair.reference_model, input_ids), jax_logits, tolerance))
    return StageResult(rows, {"torch_base_logits": torch_logits, "jax_base_logits": jax_logits})
