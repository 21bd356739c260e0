"""Stage 3: the same non-zero A and B change the logits by the same amount in both halves, and in PEFT."""

from __future__ import annotations

import numpy as np

from parity.adapted import AdaptedPair, guard_rows
from parity.peft_reference import peft_available, reference_rows
from parity.results import StageResult, compare_arrays
from parity.tolerances import tolerance_for


def check_forward_delta(adapted: AdaptedPair, input_ids: np.ndarray, label: str = "") -> StageResult:
    """Compares LoRA logits, and the deltas ``logits_lora - logits_base``, across the halves and with PEFT.

    The delta row is the sharp one: a scaling mistake (alpha instead of alpha/r) moves
    the delta by a factor r while moving the logits by much less. The PEFT rows (``peft`` installed)
    hold JAX to ``peft.PeftModel`` with the same values (``AdaptedPair.peft_model``): a DoRA norm or
    a pattern rule that both halves got wrong the same way passes torch vs JAX but not these.
    """
    pair, suffix = adapted.pair, f" [{label}]" if label else ""
    torch_base = pair.torch_logits(pair.torch_model, input_ids)
    jax_base = pair.jax_logits(input_ids)
    torch_lora = pair.torch_logits(adapted.torch_model, input_ids)
    jax_lora = pair.jax_logits(input_ids, adapter=adapted.adapter)
    rows = [
        *guard_rows("forward_delta", adapted),
        compare_arrays("forward_delta", f"LoRA logits torch vs JAX{suffix}", torch_lora, jax_lora,
                       tolerance_for("logits", pair.dtype)),
        compare_arrays("forward_delta", f"delta (lora - base) torch vs JAX{suffix}", torch_lora - torch_base,
                       jax_lora - jax_base, tolerance_for("delta", pair.dtype),
                       detail=f"max |delta| {np.abs(jax_lora - jax_base).max():.3g}"),
    ]
    if peft_available():
        logits_tol, delta_tol = tolerance_for("logits", pair.dtype), tolerance_for("delta", pair.dtype)
        names = (f"LoRA logits peft.PeftModel vs JAX{suffix}", f"delta (lora - base) peft.PeftModel vs JAX{suffix}")

        def peft_rows() -> list:
            peft_lora = pair.torch_logits(adapted.peft_model, input_ids)
            return [compare_arrays("forward_delta", names[0], peft_lora, jax_lora, logits_tol),
                    compare_arrays("forward_delta", names[1], peft_lora - torch_base, jax_lora - jax_base, delta_tol)]

        rows += reference_rows("forward_delta", [(names[0], logits_tol), (names[1], delta_tol)], peft_rows)
    return StageResult(rows, {"torch_lora_logits": torch_lora, "jax_lora_logits": jax_lora})
