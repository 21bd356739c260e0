"""Stages for several named adapters on one base: switching, mixed batches, weighted combinations.

Each adapter is a PEFT directory, loaded by name into both halves (``lora_jax.AdapterSet``, lora_torch's
named adapters) and into PEFT itself (``PeftModel.from_pretrained`` + ``load_adapter``), so the values are
the files' values in all three, never drawn twice.

- switching: each adapter alone; JAX vs torch, and vs PEFT's ``set_adapter``.
- mixed_batch: example i uses ``names[i % (K+1)]``, the (K+1)-th being ``"__base__"``. JAX's one forward vs
  torch's ``adapter_names`` and ``PeftModel(..., adapter_names=...)``; each row of JAX's batch vs PEFT with that
  adapter alone (so a routing bug cannot hide behind two halves that share it); the loss and the gradients
  of every adapter in the mixed batch, vs torch and vs PEFT (eval mode, every adapter's factors trainable), and
  three AdamW steps on it (``parity.checks.mixed_training``).
- combination: ``cat``, ``linear`` (equal ranks only) and ``svd`` in each half vs a dense float64 reference
  computed here from the loaded factors (not by ``lora_format.combine``, the code both halves share): the
  exact sum ``sum_i w_i s_i A_i B_i`` for cat, its best rank-k approximation for svd, PEFT's own definition
  for linear; and PEFT's ``add_weighted_adapter`` vs the same reference where PEFT is exact (its first adapter
  without rsLoRA: docs/many_adapters.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.checks.mixed_training import (
    as_numpy,
    factor_leaves,
    jax_named_factors,
    mixed_training_rows,
    torch_mixed_loss,
)
from parity.pair import ModelPair
from parity.peft_reference import peft_available, reference_rows
from parity.results import StageResult, Tolerance, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named

BASE_NAME = "__base__"
MULTI_CHECKS = ("switching", "mixed_batch", "combination")
COMBINED = "combined"
# The dense reference of a combined delta is float64; the halves compute the combination in float64 too and
# store float32 factors, so the difference is float32 rounding of |delta| (rel ~1e-7). The bound is the
# merged-weights kind's (one float32 product of identical operands).
_COMBINATION_KIND = "merged_weights"
# PEFT takes the svd combination's SVD of the float32 delta (torch.linalg.svd in float32). Its rounding, ~6e-8 x
# |delta|, moves the truncated rank-k result by that times sigma_1 / (sigma_k - sigma_k+1), which a close pair of
# singular values makes large: measured 2.5e-6 to 1.1e-5 relative over random adapters on the tiny and embedded
# GPT-2s (the halves take it in float64 and are held to 1e-6). The bound keeps 10x room for small gaps; a wrong
# rank, scaling or weight moves the delta by O(1).
_PEFT_SVD_TOLERANCE = Tolerance(rtol=1e-4, why="PEFT's float32 SVD, truncated: rounding grown by 1/spectral gap")


@dataclass(frozen=True)
class ManyAdapters:
    """K named adapters in both halves.

    Attributes:
        pair: The base pair.
        names: The adapter names, in ``--adapter`` order.
        dirs: Their PEFT directories.
        adapter_set: ``lora_jax.AdapterSet`` of the K adapters (dropout 0).
        torch_model: A torch base copy holding the K adapters (lora_torch), eval mode.
    """

    pair: ModelPair
    names: tuple[str, ...]
    dirs: tuple[Path, ...]
    adapter_set: Any
    torch_model: Any

    @functools.cached_property
    def peft_model(self) -> Any:
        """``PeftModel.from_pretrained`` of the first adapter, ``load_adapter`` of the others (eval mode)."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.pair.torch_copy(), str(self.dirs[0]), adapter_name=self.names[0])
        for name, path in zip(self.names[1:], self.dirs[1:]):
            model.load_adapter(str(path), adapter_name=name)
        return model.eval()

    def mixed_names(self, batch_size: int) -> list[str]:
        """``names[i % (K+1)]`` with ``"__base__"`` as the (K+1)-th name, for ``batch_size`` examples."""
        cycle = [*self.names, BASE_NAME]
        return [cycle[i % len(cycle)] for i in range(batch_size)]


def load_many(pair: ModelPair, adapters: Sequence[tuple[str, str]]) -> ManyAdapters:
    """Loads ``(name, dir)`` adapters into both halves (JAX dropout set to 0: masks cannot match)."""
    import lora_torch
    from lora_jax import AdapterSet

    jax_adapters = {}
    for name, path in adapters:
        adapter = pair.impl.jax_load_adapter(Path(path), pair.jax_params)
        jax_adapters[name] = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, dropout=0.0))
    model = pair.torch_copy()
    for name, path in adapters:
        lora_torch.load_adapter(model, path, adapter_name=name)
    model.eval()
    return ManyAdapters(pair=pair, names=tuple(n for n, _ in adapters), dirs=tuple(Path(p) for _, p in adapters),
                        adapter_set=AdapterSet(jax_adapters), torch_model=model)


def _jax_logits(many: ManyAdapters, ids: np.ndarray, adapter_set: Any, adapter_names: Any = None) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    pair = many.pair
    forward = pair.impl.jax_lora_apply(pair.jax_module().apply)
    x = jax.device_put(jnp.asarray(ids, jnp.int32), pair.placement.jax_device)
    if adapter_names is None:
        return np.asarray(forward(pair.jax_params, adapter_set, x), np.float32)
    return np.asarray(forward(pair.jax_params, adapter_set, x, adapter_names=list(adapter_names)), np.float32)


def _torch_logits(many: ManyAdapters, model: Any, ids: np.ndarray, **kwargs: Any) -> np.ndarray:
    import torch

    with torch.no_grad(), many.pair.torch_autocast():
        return model(many.pair.torch_ids(ids), **kwargs).logits.float().cpu().numpy()


def check_switching(many: ManyAdapters, input_ids: np.ndarray) -> StageResult:
    """Each adapter alone: JAX (``with_active``) vs lora_torch (``set_adapter``) and vs PEFT's ``set_adapter``."""
    import lora_torch

    tol = tolerance_for("logits", many.pair.dtype)
    rows, base = [], many.pair.jax_logits(input_ids)
    for name in many.names:
        jax_l = _jax_logits(many, input_ids, many.adapter_set.with_active(name))
        lora_torch.set_adapter(many.torch_model, name)
        moved = float(np.max(np.abs(jax_l - base)))
        rows.append(compare_arrays("switching", f"[{name}] logits torch vs JAX", _torch_logits(
            many, many.torch_model, input_ids), jax_l, tol, detail=f"the adapter moves the logits by max {moved:.3g}"))
        if peft_available():
            row = f"[{name}] logits peft set_adapter vs JAX"

            def peft_row(name: str = name, jax_l: np.ndarray = jax_l, row: str = row) -> list:
                many.peft_model.set_adapter(name)
                return [compare_arrays("switching", row, _torch_logits(many, many.peft_model, input_ids), jax_l, tol)]

            rows += reference_rows("switching", [(row, tol)], peft_row)
    lora_torch.set_adapter(many.torch_model, many.names[0])
    return StageResult(rows)


def check_mixed_batch(many: ManyAdapters, input_ids: np.ndarray) -> StageResult:
    """One batch, example i with ``names[i % (K+1)]``: logits, each row vs PEFT alone, loss and gradients."""
    import lora_torch

    pair, dtype = many.pair, many.pair.dtype
    names = many.mixed_names(len(input_ids))
    tol = tolerance_for("logits", dtype)
    jax_l = _jax_logits(many, input_ids, many.adapter_set, names)
    with lora_torch.adapter_names(many.torch_model, names):
        torch_l = _torch_logits(many, many.torch_model, input_ids)
    rows = [compare_arrays("mixed_batch", "mixed logits torch vs JAX", torch_l, jax_l, tol,
                           detail=f"names {names}")]
    arrays = {"mixed_input_ids": input_ids, "jax_mixed_logits": jax_l, "torch_mixed_logits": torch_l,
              "mixed_adapter_names": names}
    if peft_available():
        labels = ("mixed logits peft adapter_names vs JAX", "each example vs peft with its adapter alone")

        def peft_rows() -> list:
            peft_l = _torch_logits(many, many.peft_model, input_ids, adapter_names=names)
            alone = np.empty_like(jax_l)
            for i, name in enumerate(names):
                if name == BASE_NAME:
                    alone[i] = pair.torch_logits(pair.torch_model, input_ids[i:i + 1])[0]
                else:
                    many.peft_model.set_adapter(name)
                    alone[i] = _torch_logits(many, many.peft_model, input_ids[i:i + 1])[0]
            many.peft_model.set_adapter(many.names[0])
            return [compare_arrays("mixed_batch", labels[0], peft_l, jax_l, tol),
                    compare_arrays("mixed_batch", labels[1], jax_l, alone, tol)]

        rows += reference_rows("mixed_batch", [(label, tol) for label in labels], peft_rows)
    rows += _mixed_gradient_rows(many, input_ids, names)
    rows += mixed_training_rows(many, input_ids, names)
    return StageResult(rows, arrays)


def _torch_grads(many: ManyAdapters, model: Any, ids: np.ndarray, names: list[str], peft: bool) -> tuple:
    params = factor_leaves(model, many.names, peft)
    flags = {key: p.requires_grad for key, (p, _) in params.items()}
    for p, _ in params.values():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        loss = torch_mixed_loss(many, model, ids, names, peft)
        loss.backward()
        grads = as_numpy(params, grads=True)
    finally:
        model.zero_grad(set_to_none=True)
        for key, (p, _) in params.items():
            p.requires_grad_(flags[key])
    return float(loss.detach()), grads


def _mixed_gradient_rows(many: ManyAdapters, input_ids: np.ndarray, names: list[str]) -> list:
    import jax
    import jax.numpy as jnp
    from lora_jax import next_token_loss

    pair = many.pair
    forward = pair.impl.jax_lora_apply(pair.jax_module().apply)
    example_ids = many.adapter_set.example_ids(names)
    x = jax.device_put(jnp.asarray(input_ids, jnp.int32), pair.placement.jax_device)

    def loss_fn(adapter_set: Any) -> Any:
        return next_token_loss(forward(pair.jax_params, adapter_set, x, adapter_names=example_ids), x, None)

    loss_j, grads = jax.value_and_grad(loss_fn)(many.adapter_set)
    grads_j = jax_named_factors(grads, many.names)
    loss_tol, grads_tol = tolerance_for("train_loss", pair.dtype), tolerance_for("grads", pair.dtype)
    loss_t, grads_t = _torch_grads(many, many.torch_model, input_ids, names, peft=False)
    rows = [compare_arrays("mixed_batch", "mixed loss torch vs JAX", loss_t, float(loss_j), loss_tol),
            compare_named_arrays("mixed_batch", "mixed dL/dA, dL/dB of every adapter torch vs JAX (worst tensor)",
                                 grads_t, grads_j, grads_tol)]
    if peft_available():
        labels = ("mixed loss peft vs JAX", "mixed dL/dA, dL/dB of every adapter peft vs JAX (worst tensor)")

        def peft_rows() -> list:
            loss_p, grads_p = _torch_grads(many, many.peft_model, input_ids, names, peft=True)
            return [compare_arrays("mixed_batch", labels[0], loss_p, float(loss_j), loss_tol),
                    compare_named_arrays("mixed_batch", labels[1], grads_p, grads_j, grads_tol)]

        rows += reference_rows("mixed_batch", [(labels[0], loss_tol), (labels[1], grads_tol)], peft_rows)
    return rows


def _scaled_factors(adapter: Any) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{module: (A, B, s)}`` in float64, ``s`` from the adapter's own config (rank, alpha, rsLoRA, patterns)."""
    return {".".join(path): (np.asarray(a, np.float64), np.asarray(b, np.float64), float(adapter.scaling(path)))
            for path, (a, b) in adapter.modules().items()}


def dense_reference(kind: str, inputs: Sequence[dict], weights: Sequence[float], rank: int) -> dict[str, np.ndarray]:
    """The float64 delta ``(in, out)`` per module of a combination, computed from the definitions.

    cat: ``sum_i w_i s_i A_i B_i``; svd: its best rank-``rank`` approximation (Eckart-Young); linear: PEFT's
    definition ``(sum_i sign(w_i s_i) sqrt|w_i s_i| A_i)(sum_i sqrt|w_i s_i| B_i)``.

    >>> one = {"m": (np.eye(2)[:, :1], np.ones((1, 2)), 2.0)}
    >>> two = {"m": (np.eye(2)[:, 1:], np.ones((1, 2)), 0.5)}
    >>> dense_reference("cat", [one, two], [1.0, 2.0], 2)["m"].tolist()
    [[2.0, 2.0], [1.0, 1.0]]
    """
    modules = sorted({name for adapter in inputs for name in adapter})
    out = {}
    for name in modules:
        parts = [(w, adapter[name]) for w, adapter in zip(weights, inputs) if name in adapter]
        if kind == "linear":
            a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for w, (a, _, s) in parts)
            b = sum(math.sqrt(abs(w * s)) * b for w, (_, b, s) in parts)
            out[name] = a @ b
            continue
        total = sum(w * s * (a @ b) for w, (a, b, s) in parts)
        if kind == "svd":
            u, sv, vh = np.linalg.svd(total, full_matrices=False)
            total = (u[:, :rank] * sv[:rank]) @ vh[:rank]
        out[name] = total
    return out


def _combined_deltas_jax(adapter: Any) -> dict[str, np.ndarray]:
    return {name: s * (a @ b) for name, (a, b, s) in _scaled_factors(adapter).items()}


def _combined_deltas_torch(model: Any) -> dict[str, np.ndarray]:
    from lora_torch import lora_wrappers

    return {module: w.adapters[COMBINED].delta_kernel().detach().double().cpu().numpy()
            for module, w in lora_wrappers(model).items() if COMBINED in w.adapters}


def _combined_deltas_peft(model: Any) -> dict[str, np.ndarray]:
    from parity.peft_reference import peft_layers

    deltas = {}
    for module, layer in peft_layers(model).items():
        if COMBINED in layer.lora_A:
            a = layer.lora_A[COMBINED].weight.detach().double().cpu().numpy().T
            b = layer.lora_B[COMBINED].weight.detach().double().cpu().numpy().T
        elif COMBINED in layer.lora_embedding_A:
            a = layer.lora_embedding_A[COMBINED].detach().double().cpu().numpy().T
            b = layer.lora_embedding_B[COMBINED].detach().double().cpu().numpy().T
        else:
            continue
        deltas[module] = layer.scaling[COMBINED] * (a @ b)
    return deltas


def _relative_rows(name: str, actual: dict, expected: dict, tol: Any) -> Any:
    """Per-module deltas, each module's error relative to its own reference scale; a missing module fails."""
    return compare_named_arrays("combination", name, actual, expected, tol)


def check_combination(many: ManyAdapters, input_ids: np.ndarray, weights: Sequence[float]) -> StageResult:
    """cat / linear / svd in each half (and PEFT where exact) vs the dense float64 reference."""
    import lora_torch
    from lora_jax import add_weighted_adapter

    inputs = [_scaled_factors(many.adapter_set.adapters[name]) for name in many.names]
    ranks = [max(a.shape[1] for a, _, _ in f.values()) for f in inputs]
    kinds = ["cat", "svd"] + (["linear"] if len({a.shape[1] for f in inputs for a, _, _ in f.values()}) == 1 else [])
    tol = tolerance_for(_COMBINATION_KIND, many.pair.dtype)
    first_rslora = many.adapter_set.adapters[many.names[0]].config.use_rslora
    rows, arrays = [], {}
    for kind in kinds:
        rank = sum(ranks) if kind == "cat" else max(ranks)
        reference = dense_reference(kind, inputs, weights, rank)
        what = {"cat": "exact sum", "svd": f"best rank-{rank} of the sum", "linear": "PEFT's linear definition"}[kind]
        combined = add_weighted_adapter(many.adapter_set, list(many.names), list(weights), COMBINED,
                                        combination_type=kind)
        rows.append(_relative_rows(f"[{kind}] JAX combined delta vs dense float64 ({what})",
                                   _combined_deltas_jax(combined.adapters[COMBINED]), reference, tol))
        model = copy.deepcopy(many.torch_model)
        lora_torch.add_weighted_adapter(model, list(many.names), list(weights), COMBINED, combination_type=kind)
        rows.append(_relative_rows(f"[{kind}] torch combined delta vs dense float64 ({what})",
                                   _combined_deltas_torch(model), reference, tol))
        if kind == "cat":
            lora_torch.set_adapter(model, COMBINED)
            arrays["jax_combined_cat_logits"] = _jax_logits(many, input_ids, combined.with_active(COMBINED))
            arrays["torch_combined_cat_logits"] = _torch_logits(many, model, input_ids)
            rows.append(compare_arrays("combination", "[cat] combined logits torch vs JAX",
                                       arrays["torch_combined_cat_logits"], arrays["jax_combined_cat_logits"],
                                       tolerance_for("logits", many.pair.dtype), detail=f"weights {list(weights)}"))
        if peft_available() and not first_rslora:  # PEFT copies the first input's rsLoRA: its gap is documented
            label = f"[{kind}] peft add_weighted_adapter delta vs dense float64 ({what})"

            # PEFT's cat and linear are products of float32 factors, held to the merged-weights bound like the
            # halves; its svd is its own (see _PEFT_SVD_TOLERANCE).
            peft_tol = _PEFT_SVD_TOLERANCE if kind == "svd" else tol

            def peft_row(kind: str = kind, label: str = label, reference: dict = reference, t: Any = peft_tol) -> list:
                peft = copy.deepcopy(many.peft_model)
                peft.add_weighted_adapter(list(many.names), list(weights), COMBINED, combination_type=kind)
                return [_relative_rows(label, _combined_deltas_peft(peft), reference, t)]

            rows += reference_rows("combination", [(label, peft_tol)], peft_row)
    return StageResult(rows, arrays)
