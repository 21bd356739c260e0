"""``add_weighted_adapter``: a new adapter made of a weighted combination of existing ones (PEFT's name).

The arithmetic is ``lora_format.combine.combine_adapters``, shared with lora_jax and computed in
float64; this module hands it each adapter's factors in this package's layout (A (in, r), B (r, out),
scaling ``s``) and builds the result as a new adapter. The new adapter has one rank ``r'`` in every
module, ``lora_alpha = r'`` and no rsLoRA, so its scaling is exactly 1 (the weights ``w_i s_i`` sit in
its factors):

- ``"cat"``: exact, ``A' B' = sum_i w_i s_i A_i B_i`` for any ranks, alphas and rsLoRA; ``r' = sum_i r_i``.
- ``"linear"``: PEFT's weighted sum of the factors (equal ranks only); not the sum of the deltas.
- ``"svd"``: the best rank-``svd_rank`` approximation of ``sum_i w_i s_i A_i B_i`` (default: the largest rank).

Where PEFT differs (rsLoRA: PEFT keeps the first adapter's ``use_rslora`` with ``lora_alpha = r'``,
so its combined delta is ``sqrt(r')`` times too large), this follows the exact target instead; see
``lora_format.combine``. The modules are the union of the inputs'; the new adapter's dropout is the
first input's. As in PEFT, it is not active and its parameters do not require grad until
``set_adapter``. Embedding adapters combine the same way (``s A B`` is their table update). DoRA
adapters are refused: a magnitude vector has no weighted sum that keeps DoRA's meaning.

>>> import torch
>>> from torch import nn
>>> from lora_torch.inject import add_adapter, inject_lora
>>> model = inject_lora(nn.Sequential(nn.Linear(3, 2)), ["0"], rank=1, init_lora_weights=False, verbose=False)
>>> model = add_adapter(model, "b", ["0"], rank=2, use_rslora=True, init_lora_weights=False, verbose=False)
>>> model = add_weighted_adapter(model, ["default", "b"], [0.5, -1.0], "mix", combination_type="cat")
>>> mix, one, two = (model[0].adapters[n] for n in ("mix", "default", "b"))
>>> mix.rank, mix.scaling, torch.allclose(mix.delta_kernel(), 0.5 * one.delta_kernel() - two.delta_kernel())
(3, 1.0, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lora_format.combine import COMBINATION_TYPES, Factors, combine_adapters
from lora_torch.embedding import EmbeddingLoRALayer
from lora_torch.inject import adapter_layers, list_adapters, lora_wrappers
from lora_torch.layers import LoRALayer, check_adapter_name

__all__ = ["add_weighted_adapter"]


def _factors(layer: LoRALayer) -> Factors:
    return Factors(layer.lora_A.detach().to("cpu", torch.float64).numpy(),
                   layer.lora_B.detach().to("cpu", torch.float64).numpy(), layer.scaling)


def _dropout(layers: dict[str, LoRALayer]) -> float:
    linear = [layer.dropout_p for layer in layers.values() if not isinstance(layer, EmbeddingLoRALayer)]
    return linear[0] if linear else 0.0


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Adds adapter ``adapter_name``, the combination ``sum_i weights[i] * adapters[i]``; returns ``model``.

    Arguments as PEFT's ``add_weighted_adapter`` (its ``cat``, ``linear`` and ``svd`` types). The inputs,
    the other adapters and the base weights are not changed; every check runs before anything is built.

    Args:
        model: a model with the adapters ``adapters``.
        adapters: the adapters to combine, each named once.
        weights: one finite weight per adapter; a negative weight subtracts.
        adapter_name: a new name.
        combination_type: ``"cat"`` (exact, rank = sum of ranks), ``"linear"`` (equal ranks; PEFT's
            weighted sum of factors) or ``"svd"`` (PEFT's default; best rank-``svd_rank`` approximation).
            With one adapter every type is ``"linear"``, as in PEFT.
        svd_rank: the rank of an ``svd`` combination; default the largest input rank.

    Raises:
        ValueError: an unknown, repeated or DoRA input adapter, a name already taken, weights that are not
            finite or not one per adapter, an unknown ``combination_type``, unequal ranks for ``linear``, or
            inputs whose modules differ in shape.
    """
    check_adapter_name(adapter_name)
    available = list_adapters(model)
    if adapter_name in available:
        raise ValueError(f"the model already has an adapter named {adapter_name!r} (adapters: {available}); choose a "
                         "new name for the combination, or delete_adapter the old one first.")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine.")
    repeated = sorted({name for name in adapters if adapters.count(name) > 1})
    if repeated:
        raise ValueError(f"add_weighted_adapter: {repeated} listed more than once; list each adapter once, with the "
                         "sum of its weights.")
    unknown = [name for name in adapters if name not in available]
    if unknown:
        raise ValueError(f"add_weighted_adapter: no adapter named {unknown} in the model; its adapters are "
                         f"{available}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {COMBINATION_TYPES} (PEFT's "
                         "ties/dare/magnitude_prune types are not implemented here).")
    inputs = [adapter_layers(model, name) for name in adapters]
    dora = [name for name, layers in zip(adapters, inputs) if any(layer.use_dora for layer in layers.values())]
    if dora:
        raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters ({dora}): their magnitude vectors have no "
                         "weighted sum that keeps DoRA's meaning. Merge them, or combine plain LoRA adapters.")
    rank, combined = combine_adapters(combination_type,
                                      [{name: _factors(layer) for name, layer in layers.items()} for layers in inputs],
                                      weights, svd_rank)
    wrappers = lora_wrappers(model)
    dropout = _dropout(inputs[0])
    branches = {}
    for name, factors in combined.items():
        wrapper = wrappers[name]
        like = next(layers[name] for layers in inputs if name in layers).lora_A
        branch = wrapper.new_branch(rank=rank, lora_alpha=float(rank), dropout=dropout, use_rslora=False)
        with torch.no_grad():
            branch.lora_A.copy_(torch.from_numpy(np.ascontiguousarray(factors.a)).to(like.dtype))
            branch.lora_B.copy_(torch.from_numpy(np.ascontiguousarray(factors.b)).to(like.dtype))
        branches[name] = branch.to(device=like.device).requires_grad_(False)
    for name, branch in branches.items():
        wrappers[name].add_adapter(adapter_name, branch)
    return model
