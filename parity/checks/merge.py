"""Stage 6: merging folds the same update into the same weights (as PEFT's), changes no logits, and unmerges.

DoRA merges ``(m / ||W0 + s A B||_c) * (W0 + s A B)``; JAX's unmerge then needs the norms taken
before the merge (``lora_jax.dora_weight_norms``), torch keeps ``W0`` itself.

LoRA on GPT-2's ``wte`` is the exception to "changes no logits": unmerged, only the lookup is adapted, while
merging writes ``E + s A B`` into the table the tied head shares, so the head changes too, in PEFT's
``merge_and_unload`` as in both halves (docs/variants.md). There each side's merged logits are held to
PEFT's merged logits instead of to its own unmerged ones, and the row's detail gives how far merging moved them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import numpy as np

from parity.adapted import AdaptedPair, guard_rows
from parity.linear_layout import conv1d_to_linear
from parity.peft_reference import merged_kernels as torch_merged_kernels
from parity.peft_reference import peft_available, reference_rows
from parity.results import CheckResult, StageResult, Tolerance, array_errors, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_embeddings, adapter_magnitudes, adapter_to_named, copy_into_torch, jax_kernel

PEFT_MERGED = "peft merge_and_unload"


def merged_weights_kind(config: Any) -> str:
    """The tolerance kind of merged kernels: DoRA's column rescaling rounds its norm once more than a plain merge."""
    return "dora_merged_weights" if config.use_dora else "merged_weights"


def _jax_kernels(params: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Each module's Flax kernel (in, out) as float32 numpy."""
    return {name: np.asarray(jax_kernel(params, name), dtype=np.float32) for name in names}


def _torch_kernels(model: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Each module's weight in kernel orientation (in, out): Conv1D as stored, nn.Linear transposed."""
    from torch import nn

    kernels = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight.detach().float().cpu().numpy()
        kernels[name] = weight.T if isinstance(module, nn.Linear) else weight
    return kernels


def compare_unmerge(name: str, restored: dict[str, np.ndarray], base: dict[str, np.ndarray],
                    merged: dict[str, np.ndarray], tolerance: Tolerance) -> CheckResult:
    """Unmerged vs base kernels, each module's error relative to its MERGED kernel's scale.

    ``(W0 + sAB) - sAB`` returns ``W0`` up to one rounding of ``W0 + sAB``; when ``sAB`` is larger than
    ``W0`` (a trained or large-B adapter), that rounding is large next to ``max|W0|`` but not next to
    ``max|W0 + sAB|``, the scale it happens at. The row reports the worst module.

    >>> base, merged = {"m": np.array([0.01, 0.0])}, {"m": np.array([0.01, 1.0])}
    >>> row = compare_unmerge("unmerge", {"m": np.array([0.01, 6e-8])}, base, merged, Tolerance(rtol=1e-6))
    >>> row.passed, round(row.max_rel, 9), row.detail
    (True, 6e-08, 'worst: m')
    """
    worst_key, worst_abs, worst_rel = "", 0.0, 0.0
    for key in sorted(base):
        max_abs, _ = array_errors(restored[key], base[key])
        scale = float(np.max(np.abs(np.asarray(merged[key], np.float64))))
        rel = max_abs / scale if scale else (0.0 if max_abs == 0.0 else float("inf"))
        worst_abs = max(worst_abs, max_abs)
        if rel >= worst_rel:
            worst_key, worst_rel = key, rel
    return CheckResult(stage="merge", name=name, max_abs=worst_abs, max_rel=worst_rel, tolerance=tolerance,
                       passed=tolerance.admits(worst_abs, worst_rel), detail=f"worst: {worst_key}")


def tied_embeddings(adapted: AdaptedPair) -> tuple[str, ...]:
    """The adapter's embeddings whose table the output head shares (GPT-2's ``wte``, unless untied)."""
    if not adapted.pair.hf_config.get("tie_word_embeddings", True):
        return ()
    return tuple(name for name in adapter_embeddings(adapted.adapter) if name == "transformer.wte")


def _merged_logits_row(adapted: AdaptedPair, side: str, merged: np.ndarray, unmerged: np.ndarray,
                       peft_merged: Any) -> list[CheckResult]:
    """Merged vs unmerged logits; with a tied embedding adapted, merged vs PEFT's merged logits instead.

    ``peft_merged`` is a callable returning PEFT's ``(kernels, logits)`` after ``merge_and_unload``.
    """
    tolerance = tolerance_for("merge_logits", adapted.pair.dtype)
    tied = tied_embeddings(adapted)
    if not tied:
        return [compare_arrays("merge", f"{side} merged vs unmerged logits", merged, unmerged, tolerance)]
    name = f"{side} merged logits vs {PEFT_MERGED} (tied head)"
    moved = float(np.max(np.abs(np.asarray(merged, np.float64) - unmerged)))

    def compare() -> list[CheckResult]:
        row = compare_arrays("merge", name, merged, peft_merged()[1], tolerance)
        return [dataclasses.replace(row, detail=f"{', '.join(tied)} shares the head: merging moved the logits by "
                                                f"max {moved:.3g}, as PEFT's merge does")]

    return reference_rows("merge", [(name, tolerance)], compare)


def _merged_pair_rows(adapted: AdaptedPair, torch_model: Any, layout: str, input_ids: np.ndarray,
                      merged_params: Any, jax_merged_logits: np.ndarray, peft_merged: Any
                      ) -> tuple[list, Any, np.ndarray]:
    """Merges a torch model of one layout; compares weights and logits with the JAX merge."""
    pair, dtype = adapted.pair, adapted.pair.dtype
    names = sorted(adapter_to_named(adapted.adapter))
    lora_logits = pair.torch_logits(torch_model, input_ids)
    merged_model = pair.impl.torch_merge(copy.deepcopy(torch_model))
    merged_logits = pair.torch_logits(merged_model, input_ids)
    rows = [
        compare_named_arrays("merge", f"merged weights torch ({layout}) vs JAX (worst module)",
                             _torch_kernels(merged_model, names), _jax_kernels(merged_params, names),
                             tolerance_for(merged_weights_kind(adapted.config), dtype)),
        *_merged_logits_row(adapted, f"torch ({layout})", merged_logits, lora_logits, peft_merged),
        compare_arrays("merge", f"merged logits torch ({layout}) vs JAX", merged_logits, jax_merged_logits,
                       tolerance_for("logits", dtype)),
    ]
    return rows, merged_model, merged_logits


def check_merge(adapted: AdaptedPair, input_ids: np.ndarray) -> StageResult:
    """Merge in both halves (and in torch's nn.Linear layout), then unmerge.

    Rows: B non-zero (DoRA: m != ||W0 + sAB||); merged weights torch vs JAX; each side's merged vs unmerged
    logits; merged torch vs merged JAX logits; the same three for the Linear layout; unmerge restoring the
    base weights in each half; and, with ``peft`` installed, PEFT's ``merge_and_unload`` kernels vs JAX's.
    """
    pair, adapter, dtype = adapted.pair, adapted.adapter, adapted.pair.dtype
    names = sorted(adapter_to_named(adapter))

    @functools.cache
    def peft_merged() -> tuple[dict[str, np.ndarray], np.ndarray]:  # PEFT's merge, done once when first asked
        merged = copy.deepcopy(adapted.peft_model).merge_and_unload()
        return torch_merged_kernels(merged, names), pair.torch_logits(merged, input_ids)

    merged_params = pair.impl.jax_merge(pair.jax_params, adapter)
    jax_merged = pair.jax_logits(input_ids, params=merged_params)
    jax_lora = pair.jax_logits(input_ids, adapter=adapter)
    rows = [*guard_rows("merge", adapted), *_merged_logits_row(adapted, "JAX", jax_merged, jax_lora, peft_merged)]
    conv_rows, merged_model, torch_merged = _merged_pair_rows(adapted, adapted.torch_model, "Conv1D", input_ids,
                                                              merged_params, jax_merged, peft_merged)
    rows += conv_rows
    linear_model = pair.impl.torch_inject(conv1d_to_linear(pair.torch_copy()), adapter.config)
    copy_into_torch(linear_model, adapter_to_named(adapter), adapter_magnitudes(adapter))
    rows += _merged_pair_rows(adapted, linear_model, "Linear", input_ids, merged_params, jax_merged, peft_merged)[0]
    restored = pair.impl.torch_unmerge(merged_model)  # in place: merged_model is unmerged too
    base_kernels = _torch_kernels(pair.torch_model, names)
    restored_kernels = {n: restored.get_submodule(n).base_layer.weight.detach().float().cpu().numpy() for n in names}
    if adapter.config.use_dora:  # a merged DoRA kernel's columns have norm |m|: the norms must be kept from before
        norms = pair.impl.jax_dora_weight_norms(pair.jax_params, adapter)
        unmerged_params = pair.impl.jax_unmerge(merged_params, adapter, weight_norms=norms)
    else:
        unmerged_params = pair.impl.jax_unmerge(merged_params, adapter)
    merged_kernels = _jax_kernels(merged_params, names)
    rows += [
        compare_unmerge("torch unmerge restores base weights", restored_kernels, base_kernels, merged_kernels,
                        tolerance_for("unmerge", dtype)),
        compare_unmerge("JAX unmerge restores base kernels", _jax_kernels(unmerged_params, names),
                        _jax_kernels(pair.jax_params, names), merged_kernels, tolerance_for("unmerge", dtype)),
    ]
    if peft_available():
        name, tolerance = "merged weights peft merge_and_unload vs JAX (worst module)", tolerance_for(
            merged_weights_kind(adapter.config), dtype)
        rows += reference_rows("merge", [(name, tolerance)], lambda: [compare_named_arrays(
            "merge", name, peft_merged()[0], merged_kernels, tolerance)])
    return StageResult(rows, {"torch_merged_logits": torch_merged, "jax_merged_logits": jax_merged})
