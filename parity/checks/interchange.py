"""Stage 7: an adapter saved by one half loads in the other and in PEFT, and one saved by PEFT loads in both.

Every crossing must keep the tensors bit for bit (A, B and DoRA's m; the format is float32 both ways)
and give the logits of the model that saved it. The PEFT-saved direction reads a file written by
PEFT alone (``PeftModel.save_pretrained``), so a key or config rule both halves share
(``lora_format.peft_keys``, ``lora_format.peft_fields``) is held to PEFT's, not only to itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from parity.adapted import AdaptedPair
from parity.peft_reference import peft_available, peft_leaves, reference_rows
from parity.results import EXACT, StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_leaves, torch_lora_leaves


def peft_logits(adapted: AdaptedPair, adapter_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    """Logits of ``peft.PeftModel.from_pretrained(base copy, adapter_dir)`` (transformers' 4-bit base with ``--quantize``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(adapted.pair.reference_copy(), str(adapter_dir)).eval()
    return adapted.pair.torch_logits(model, input_ids)


def _peft_saved_rows(adapted: AdaptedPair, peft_dir: Path, input_ids: np.ndarray, leaves: str) -> list:
    """``AdaptedPair.peft_model.save_pretrained`` -> loaded by each half: tensors and logits vs PEFT's."""
    pair = adapted.pair
    adapted.peft_model.save_pretrained(str(peft_dir))
    reference_leaves = peft_leaves(adapted.peft_model)
    reference_logits = pair.torch_logits(adapted.peft_model, input_ids)
    jax_loaded = pair.impl.jax_load_adapter(peft_dir, pair.jax_float_params())
    torch_loaded = pair.impl.torch_load_adapter(pair.torch_copy(), peft_dir)
    tolerance = tolerance_for("interchange_logits", pair.dtype)
    return [
        compare_named_arrays("interchange", f"PEFT-saved -> JAX-loaded {leaves}", adapter_leaves(jax_loaded),
                             reference_leaves, EXACT),
        compare_arrays("interchange", "PEFT-saved adapter: JAX logits vs peft.PeftModel", pair.jax_logits(
            input_ids, adapter=jax_loaded), reference_logits, tolerance),
        compare_named_arrays("interchange", f"PEFT-saved -> torch-loaded {leaves}", torch_lora_leaves(torch_loaded),
                             reference_leaves, EXACT),
        compare_arrays("interchange", "PEFT-saved adapter: torch logits vs peft.PeftModel", pair.torch_logits(
            torch_loaded, input_ids), reference_logits, tolerance),
    ]


def check_interchange(adapted: AdaptedPair, input_ids: np.ndarray, workdir: str | Path | None = None) -> StageResult:
    """JAX-saved adapter -> torch (and PEFT when installed); torch-saved adapter -> JAX; PEFT-saved -> both.

    Rows: the tensors after each crossing must be bit-identical to the ones saved (the
    format is float32 both ways), and the logits after loading must match the saving
    side's LoRA logits.
    """
    pair, adapter, dtype = adapted.pair, adapted.adapter, adapted.pair.dtype
    leaves = "A, B, m" if adapted.config.use_dora else "A, B"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        jax_dir, torch_dir = Path(tmp) / "saved_by_jax", Path(tmp) / "saved_by_torch"
        jax_lora_logits = pair.jax_logits(input_ids, adapter=adapter)
        torch_lora_logits = pair.torch_logits(adapted.torch_model, input_ids)
        pair.impl.jax_save_adapter(jax_dir, adapter)
        torch_loaded = pair.impl.torch_load_adapter(pair.torch_copy(), jax_dir)
        rows = [
            compare_named_arrays("interchange", f"JAX-saved -> torch-loaded {leaves}", torch_lora_leaves(torch_loaded),
                                 adapter_leaves(adapter), EXACT),
            compare_arrays("interchange", "JAX-saved adapter: torch logits vs JAX", pair.torch_logits(
                torch_loaded, input_ids), jax_lora_logits, tolerance_for("interchange_logits", dtype)),
        ]
        if peft_available():
            rows.append(compare_arrays("interchange", "JAX-saved adapter: peft.PeftModel logits vs JAX",
                                       peft_logits(adapted, jax_dir, input_ids), jax_lora_logits,
                                       tolerance_for("interchange_logits", dtype)))
        pair.impl.torch_save_adapter(adapted.torch_model, torch_dir)
        jax_loaded = pair.impl.jax_load_adapter(torch_dir, pair.jax_float_params())  # arrays + the config read back
        rows += [
            compare_named_arrays("interchange", f"torch-saved -> JAX-loaded {leaves}", adapter_leaves(jax_loaded),
                                 torch_lora_leaves(adapted.torch_model), EXACT),
            compare_arrays("interchange", "torch-saved adapter: JAX logits vs torch", pair.jax_logits(
                input_ids, adapter=jax_loaded), torch_lora_logits,
                tolerance_for("interchange_logits", dtype)),
        ]
        if peft_available():
            logits_tol = tolerance_for("interchange_logits", dtype)
            expected = [(f"PEFT-saved -> JAX-loaded {leaves}", EXACT),
                        ("PEFT-saved adapter: JAX logits vs peft.PeftModel", logits_tol),
                        (f"PEFT-saved -> torch-loaded {leaves}", EXACT),
                        ("PEFT-saved adapter: torch logits vs peft.PeftModel", logits_tol)]
            rows += reference_rows("interchange", expected, lambda: _peft_saved_rows(
                adapted, Path(tmp) / "saved_by_peft", input_ids, leaves))
    return StageResult(rows)
