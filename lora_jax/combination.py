"""Weighted combinations of the adapters of an ``AdapterSet`` into a new one (PEFT's ``add_weighted_adapter``).

The maths is ``lora_format.combine``'s, shared with lora_torch and tested there against the dense
float64 sum: ``cat`` is exact for any ranks, alphas and rsLoRA; ``svd`` is the best rank-``k``
approximation of the weighted sum; ``linear`` is PEFT's weighted sum of the factors. The new
adapter has rank ``r'``, alpha ``r'`` and no rsLoRA (scaling exactly 1), so it stays right where
PEFT's is off by ``sqrt(r')`` (rsLoRA inputs, PEFT issue 3761).

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.config import LoraConfig
    >>> config = LoraConfig(rank=1, alpha=2.0, target_modules=["dense"])
    >>> one = Adapter({"dense": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 3))}}, config)
    >>> adapters = add_weighted_adapter(AdapterSet({"a": one, "b": one}), ["a", "b"], [0.5, 0.25], "ab", "cat")
    >>> merged = adapters.adapters["ab"]
    >>> merged.config.rank, merged.scaling(("dense",)), (merged.weights["dense"]["lora_A"] @ merged.weights["dense"]["lora_B"]).tolist()
    (2, 1.0, [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]])
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from lora_format.combine import Factors, combine_adapters
from lora_jax.adapter import Adapter, checked_modules
from lora_jax.adapter_set import AdapterSet
from lora_jax.config import LoraConfig
from lora_jax.lora_tree import LORA_A, LORA_B, nest
from lora_jax.targets import dotted_name


def _factors(name: str, adapter: Adapter) -> dict[str, Factors]:
    if adapter.config.use_dora or adapter.embeddings():
        raise ValueError(f"adapter {name!r} has DoRA or embedding LoRA; add_weighted_adapter combines plain LoRA on "
                         "dense layers only.")
    return {dotted_name(path): Factors(np.asarray(a, np.float64), np.asarray(b, np.float64), adapter.scaling(path))
            for path, (a, b) in checked_modules(adapter).items()}


def add_weighted_adapter(
    adapters: AdapterSet,
    names: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> AdapterSet:
    """A new set holding ``adapters`` plus ``adapter_name``, the weighted combination of ``names``.

    Args:
        adapters: The set; neither it nor its adapters change.
        names: The adapters to combine, at least one, no repeats.
        weights: One finite weight per name (negative subtracts).
        adapter_name: The new adapter's name, not yet in the set.
        combination_type: ``"svd"`` (PEFT's default), ``"cat"`` or ``"linear"``; see ``lora_format.combine``.
        svd_rank: The rank of an ``svd`` combination; default the largest input rank.

    Raises:
        ValueError: An unknown or repeated name, an existing ``adapter_name``, weights that are not
            finite or not one per name, ``linear`` over unequal ranks, shapes that differ, or DoRA /
            embedding adapters. Nothing is computed before every check passed.
    """
    names = list(names)
    if not names:
        raise ValueError("add_weighted_adapter needs at least one adapter name.")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {names} repeat one; give each adapter once with its weight.")
    adapters.with_active(*names)  # raises for unknown names
    if adapter_name in adapters.adapters:
        raise ValueError(f"an adapter named {adapter_name!r} exists already; choose a new name.")
    rank, combined = combine_adapters(combination_type, [_factors(n, adapters.adapters[n]) for n in names], weights,
                                      svd_rank)
    weights_tree = nest({tuple(name.split(".")): {LORA_A: jnp.asarray(f.a, jnp.float32),
                                                  LORA_B: jnp.asarray(f.b, jnp.float32)}
                         for name, f in combined.items()})
    config = LoraConfig(rank=rank, alpha=float(rank), target_modules=sorted(combined))
    return adapters.add(adapter_name, Adapter(weights_tree, config))
