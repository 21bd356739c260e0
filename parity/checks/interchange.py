"""Stage 7: an adapter saved by one half loads in the other (and in PEFT) and gives the same logits."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from parity.adapted import AdaptedPair
from parity.results import EXACT, StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named, flat_leaves, torch_lora_to_named


def peft_logits(adapted: AdaptedPair, adapter_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    """Logits of ``peft.PeftModel.from_pretrained(base copy, adapter_dir)``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(adapted.pair.torch_copy(), str(adapter_dir)).eval()
    return adapted.pair.torch_logits(model, input_ids)


def check_interchange(adapted: AdaptedPair, input_ids: np.ndarray, workdir: str | Path | None = None) -> StageResult:
    """JAX-saved adapter -> torch (and PEFT when installed); torch-saved adapter -> JAX.

    Rows: the tensors after each crossing must be bit-identical to the ones saved (the
    format is float32 both ways), and the logits after loading must match the saving
    half's LoRA logits.
    """
    pair, adapter, dtype = adapted.pair, adapted.adapter, adapted.pair.dtype
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        jax_dir, torch_dir = Path(tmp) / "saved_by_jax", Path(tmp) / "saved_by_torch"
        jax_lora_logits = pair.jax_logits(input_ids, adapter=adapter)
        torch_lora_logits = pair.torch_logits(adapted.torch_model, input_ids)
        pair.impl.jax_save_adapter(jax_dir, adapter)
        torch_loaded = pair.impl.torch_load_adapter(pair.torch_copy(), jax_dir)
        rows = [
            compare_named_arrays("interchange", "JAX-saved -> torch-loaded A, B", flat_leaves(
                torch_lora_to_named(torch_loaded)), flat_leaves(adapter_to_named(adapter)), EXACT),
            compare_arrays("interchange", "JAX-saved adapter: torch logits vs JAX", pair.torch_logits(
                torch_loaded, input_ids), jax_lora_logits, tolerance_for("interchange_logits", dtype)),
        ]
        if importlib.util.find_spec("peft") is not None:
            rows.append(compare_arrays("interchange", "JAX-saved adapter: peft.PeftModel logits vs JAX",
                                       peft_logits(adapted, jax_dir, input_ids), jax_lora_logits,
                                       tolerance_for("interchange_logits", dtype)))
        pair.impl.torch_save_adapter(adapted.torch_model, torch_dir)
        jax_loaded = pair.impl.jax_load_adapter(torch_dir, pair.jax_params)  # arrays + the config read back
        rows += [
            compare_named_arrays("interchange", "torch-saved -> JAX-loaded A, B", flat_leaves(
                adapter_to_named(jax_loaded)), flat_leaves(torch_lora_to_named(adapted.torch_model)), EXACT),
            compare_arrays("interchange", "torch-saved adapter: JAX logits vs torch", pair.jax_logits(
                input_ids, adapter=jax_loaded), torch_lora_logits,
                tolerance_for("interchange_logits", dtype)),
        ]
    return StageResult(rows)
