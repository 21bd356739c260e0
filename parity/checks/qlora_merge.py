"""Stage 6 with a 4-bit base (``--quantize nf4``): merging dequantizes, and matches PEFT's re-quantizing merge.

A QLoRA merge cannot add ``s A B`` to 4-bit codes. ``lora_torch.merge_lora_weights`` and
``lora_jax.merge`` on the dequantized base (``ModelPair.jax_float_params``) both give a full-precision
model holding ``dequantize(W0) + s A B`` (DoRA: rescaled per column); its logits must equal the
unmerged QLoRA forward's. Unmerging gives the base back: lora_torch puts the very 4-bit layer back
(its codes and statistics are compared byte for byte), lora_jax subtracts ``s A B`` from the dense kernels.

PEFT's ``merge_and_unload`` on a bitsandbytes 4-bit model re-quantizes instead: it computes
``dequantize_4bit(W0) + delta`` and stores that back as NF4 (``peft.tuners.lora.bnb.Linear4bit.merge``).
Three rows hold JAX to it:

- the weight PEFT re-quantizes (computed by PEFT's own layer: ``get_delta_weight``, or its DoRA
  variant's ``merge_safe``) against JAX's merged kernel;
- PEFT's re-quantized bytes against ``lora_jax.quantize_nf4`` of JAX's merged kernel (exact: the merged
  kernels are identical in the first row's measurement and the quantizer is bit-exact);
- PEFT's merged logits against the JAX model holding those re-quantized kernels.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from parity.adapted import AdaptedPair, guard_rows
from parity.checks.merge import _jax_kernels, _torch_kernels, compare_unmerge, merged_weights_kind
from parity.checks.quantization import _count_differing, _jax_tables, _torch_tables
from parity.peft_reference import ADAPTER_NAME, peft_available, peft_layers, reference_rows
from parity.results import EXACT, CheckResult, StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named

STAGE = "merge"


def with_kernels(params: dict, kernels: dict[str, Any]) -> dict:
    """A copy of a nested params dict with the ``kernel`` of each dotted module name replaced.

    >>> with_kernels({"a": {"b": {"kernel": 1, "bias": 2}}}, {"a.b": 3})
    {'a': {'b': {'kernel': 3, 'bias': 2}}}
    """
    out = dict(params)
    for name, kernel in kernels.items():
        node, keys = out, name.split(".")
        for key in keys:
            node[key] = dict(node[key])
            node = node[key]
        node["kernel"] = kernel
    return out


def requantized(params: Any, merged: dict[str, np.ndarray]) -> Any:
    """The QLoRA params with each merged (in, out) kernel quantized back to NF4 of its (out, in) transpose,
    with the base's settings (block 64, double quantization); the other kernels keep their codes, as in PEFT."""
    from lora_jax.nf4 import quantize_nf4

    return with_kernels(params, {name: quantize_nf4(np.ascontiguousarray(kernel.T)) for name, kernel in merged.items()})


def peft_merged_weights(model: Any, names: list[str]) -> dict[str, np.ndarray]:
    """The (in, out) weight PEFT's 4-bit merge quantizes for each module: its own layer's arithmetic, unquantized.

    ``peft.tuners.lora.bnb.Linear4bit.merge`` computes ``dequantize_bnb_weight(W) + get_delta_weight()`` (DoRA:
    ``lora_variant.merge_safe(layer, name, W)``) and re-quantizes it; this computes the same, and stops there.
    """
    import torch
    from lora_torch.quantize import dequantize_weight

    layers, out = peft_layers(model), {}
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            base = dequantize_weight(layer.get_base_layer())  # (out, in)
            if ADAPTER_NAME in layer.lora_variant:
                weight = layer.lora_variant[ADAPTER_NAME].merge_safe(layer, ADAPTER_NAME, base)
            else:
                weight = base + layer.get_delta_weight(ADAPTER_NAME)
            out[name] = weight.float().cpu().numpy().T
    return out


def _bytes_row(name: str, ours: dict[str, Any], layers: dict[str, Any]) -> CheckResult:
    """Codes and statistics of NF4Tensors against torch Linear4bit layers: entries differing, over every module."""
    total = differing = 0
    worst = ""
    for module in sorted(ours):
        mine, theirs = _jax_tables(ours[module]), _torch_tables(layers[module])
        count = sum(_count_differing(mine[t], theirs[t]) for t in mine)
        total += sum(int(np.size(v)) for v in theirs.values() if v is not None)
        differing += count
        worst = worst or (module if count else "")
    detail = f"{differing} of {total} differ, first in {worst}" if differing else \
        f"{len(ours)} modules, {total:,} bytes and statistics identical"
    return CheckResult(stage=STAGE, name=name, max_abs=float(differing), max_rel=differing / max(total, 1),
                       tolerance=EXACT, passed=differing == 0, detail=detail)


def _restored_row(restored: Any, base: Any, names: list[str]) -> CheckResult:
    """lora_torch's unmerge puts each 4-bit wrapper back: its Linear4bit must hold the base's bytes."""
    total = differing = 0
    for name in names:
        mine, theirs = _torch_tables(restored.get_submodule(name).base_layer), _torch_tables(base.get_submodule(name))
        differing += sum(_count_differing(mine[t], theirs[t]) for t in mine)
        total += sum(int(np.size(v)) for v in theirs.values() if v is not None)
    detail = f"{differing} of {total} differ" if differing else f"{len(names)} modules, {total:,} entries identical"
    return CheckResult(stage=STAGE, name="torch unmerge restores the 4-bit base (codes, statistics)",
                       max_abs=float(differing), max_rel=differing / max(total, 1), tolerance=EXACT,
                       passed=differing == 0, detail=detail)


def _peft_rows(adapted: AdaptedPair, input_ids: np.ndarray, merged_kernels: dict[str, np.ndarray],
               jax_merged_logits: np.ndarray) -> list[CheckResult]:
    pair, names = adapted.pair, sorted(merged_kernels)
    weights_tol = tolerance_for(merged_weights_kind(adapted.config), pair.dtype)
    logits_tol = tolerance_for("logits", pair.dtype)
    row_names = ("merged weights peft (what merge_and_unload re-quantizes) vs JAX (worst module)",
                 "re-quantized merge: peft merge_and_unload NF4 bytes vs quantize_nf4(JAX merged)",
                 "merged logits peft merge_and_unload (NF4) vs JAX re-quantized merge")

    def compare() -> list[CheckResult]:
        model = copy.deepcopy(adapted.peft_model)
        peft_kernels = peft_merged_weights(model, names)
        unloaded = model.merge_and_unload()
        requant = requantized(pair.jax_params, merged_kernels)
        from parity.checks.quantization import jax_nf4_kernels

        ours = {name: q for name, q in jax_nf4_kernels(requant).items() if name in merged_kernels}
        peft_logits = pair.torch_logits(unloaded, input_ids)
        jax_requant_logits = pair.jax_logits(input_ids, params=requant, adapter=None)
        moved = float(np.max(np.abs(np.asarray(jax_requant_logits, np.float64) - jax_merged_logits)))
        logits_row = compare_arrays(STAGE, row_names[2], peft_logits, jax_requant_logits, logits_tol,
                                    detail=f"re-quantizing moved JAX's merged logits by max {moved:.3g}")
        return [compare_named_arrays(STAGE, row_names[0], peft_kernels, merged_kernels, weights_tol),
                _bytes_row(row_names[1], ours, {name: unloaded.get_submodule(name) for name in names}),
                logits_row]

    return reference_rows(STAGE, [(row_names[0], weights_tol), (row_names[1], EXACT), (row_names[2], logits_tol)],
                          compare)


def check_qlora_merge(adapted: AdaptedPair, input_ids: np.ndarray) -> StageResult:
    """Merge on a 4-bit base in both halves (dense result), unmerge, and PEFT's re-quantizing merge.

    Rows: B non-zero (DoRA: m != ||W0 + sAB||); JAX merged vs QLoRA logits; merged weights torch vs JAX;
    torch merged vs QLoRA logits; merged logits torch vs JAX; torch unmerge restoring the 4-bit bytes; JAX
    unmerge restoring the dequantized kernels; and with ``peft`` the three rows of the module docstring.
    """
    pair, adapter, dtype = adapted.pair, adapted.adapter, adapted.pair.dtype
    names = sorted(adapter_to_named(adapter))
    dense = pair.jax_float_params()
    merged_params = pair.impl.jax_merge(dense, adapter)
    jax_merged = pair.jax_logits(input_ids, params=merged_params)
    jax_lora = pair.jax_logits(input_ids, adapter=adapter)
    torch_lora = pair.torch_logits(adapted.torch_model, input_ids)
    merged_model = pair.impl.torch_merge(copy.deepcopy(adapted.torch_model))
    torch_merged = pair.torch_logits(merged_model, input_ids)
    merged_kernels = _jax_kernels(merged_params, names)
    merge_tol = tolerance_for("merge_logits", dtype)
    rows = [
        *guard_rows(STAGE, adapted),
        compare_arrays(STAGE, "JAX merged (dequantized base, float32) vs QLoRA logits", jax_merged, jax_lora,
                       merge_tol),
        compare_named_arrays(STAGE, "merged weights torch (dequantized, Conv1D) vs JAX (worst module)",
                             _torch_kernels(merged_model, names), merged_kernels,
                             tolerance_for(merged_weights_kind(adapted.config), dtype)),
        compare_arrays(STAGE, "torch merged (dequantized base) vs QLoRA logits", torch_merged, torch_lora, merge_tol),
        compare_arrays(STAGE, "merged logits torch vs JAX", torch_merged, jax_merged, tolerance_for("logits", dtype)),
    ]
    restored = pair.impl.torch_unmerge(merged_model)
    rows.append(_restored_row(restored, pair.torch_model, names))
    if adapter.config.use_dora:  # a merged DoRA kernel's columns have norm |m|: the norms must be kept from before
        norms = pair.impl.jax_dora_weight_norms(dense, adapter)
        unmerged_params = pair.impl.jax_unmerge(merged_params, adapter, weight_norms=norms)
    else:
        unmerged_params = pair.impl.jax_unmerge(merged_params, adapter)
    rows.append(compare_unmerge("JAX unmerge restores the dequantized base kernels", _jax_kernels(unmerged_params, names),
                                _jax_kernels(dense, names), merged_kernels, tolerance_for("unmerge", dtype)))
    if peft_available():
        rows += _peft_rows(adapted, input_ids, merged_kernels, jax_merged)
    return StageResult(rows, {"torch_merged_logits": torch_merged, "jax_merged_logits": jax_merged})
