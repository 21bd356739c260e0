"""Mixed batches: example ``i`` of one batch goes through adapter ``ids[i]``, in one traced program.

For each adapted module, the factors of the K adapters of an ``AdapterSet`` are stacked, each
padded with zeros to the largest rank there, plus one all-zero slot ``K`` for ``"__base__"`` (and
for adapters that do not adapt the module). Each example then gathers its own ``A`` and ``B``:

    h_i = x_i A[ids[i]]       (T, r_max)         y_i += s[ids[i]] * h_i B[ids[i]]

so the work is one rank-``r_max`` branch per example, whatever K is: no example runs another
adapter's branch. (Zero padding adds exact zeros: a rank-2 adapter padded to 16 computes the
same numbers as at rank 2.) The gathered factors cost ``B * (in + out) * r_max`` floats per module,
far less than the activations. Gradients flow back through the gathers to each adapter's own
factors, so a mixed batch trains every adapter on its own examples.

An embedding's mixed branch gathers rows ``A[ids[i], token]`` directly. DoRA adapters are refused in
a mixed batch, as PEFT refuses them.

Example:
    >>> x = jnp.ones((2, 1, 3))  # two examples, one token, 3 features
    >>> a = jnp.stack([jnp.ones((3, 1)), jnp.zeros((3, 1))])  # adapter 0 and the base slot
    >>> b = jnp.stack([jnp.ones((1, 2)), jnp.zeros((1, 2))])
    >>> mixed_dense_branch(x, jnp.array([0, 1]), a, b, jnp.array([0.5, 0.0]), dtype=jnp.float32).tolist()
    [[[1.5, 1.5]], [[0.0, 0.0]]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter
from lora_jax.lora_tree import ModulePath


def stacked_factors(adapters: Sequence[Adapter], path: ModulePath
                    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[float, ...]]:
    """``(A (K+1, in, r_max), B (K+1, r_max, out), scaling (K+1,), dropout rates)`` for the module at ``path``.

    Slot ``k < K`` holds adapter ``k``'s factors zero-padded to ``r_max`` (zeros if it does not adapt
    ``path``); slot ``K`` is all zeros, the base model.
    """
    present = [(k, adapter.modules()[path]) for k, adapter in enumerate(adapters) if path in adapter.modules()]
    fan_in, fan_out = present[0][1][0].shape[0], present[0][1][1].shape[1]
    r_max = max(a.shape[1] for _, (a, _) in present)
    a_slots = [jnp.zeros((fan_in, r_max), jnp.float32)] * (len(adapters) + 1)
    b_slots = [jnp.zeros((r_max, fan_out), jnp.float32)] * (len(adapters) + 1)
    scales, rates = [0.0] * (len(adapters) + 1), [0.0] * (len(adapters) + 1)
    for k, (a, b) in present:
        pad = r_max - a.shape[1]
        a_slots[k] = jnp.pad(jnp.asarray(a, jnp.float32), ((0, 0), (0, pad)))
        b_slots[k] = jnp.pad(jnp.asarray(b, jnp.float32), ((0, pad), (0, 0)))
        scales[k], rates[k] = adapters[k].scaling(path), adapters[k].config.dropout
    return jnp.stack(a_slots), jnp.stack(b_slots), jnp.asarray(scales, jnp.float32), tuple(rates)


def check_batch_size(ids: jax.Array, x: jax.Array) -> None:
    """Raises unless there is one adapter id per example (static shapes, so also while tracing)."""
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"adapter_names has {ids.shape[0]} entries for a batch of {x.shape[0]} examples; give one "
                         f"adapter name (or '__base__') per example.")


def _per_example(values: jax.Array, ids: jax.Array, ndim: int) -> jax.Array:
    """``values[ids]`` shaped (B, 1, ..., 1) to broadcast against an ``ndim``-dimensional batch."""
    return values[ids].reshape((ids.shape[0],) + (1,) * (ndim - 1))


def mixed_dropout(x: jax.Array, ids: jax.Array, rates: tuple[float, ...], rng: jax.Array | None) -> jax.Array:
    """Inverted dropout at each example's own adapter's rate (0 for the base slot); ``x`` itself without ``rng``."""
    check_batch_size(ids, x)
    if rng is None or max(rates) <= 0.0:
        return x
    rate = _per_example(jnp.asarray(rates, x.dtype), ids, x.ndim)
    keep = jax.random.uniform(rng, x.shape) >= rate
    return jnp.where(keep, x / (1 - rate), jnp.zeros_like(x))


def mixed_dense_branch(x: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, *,
                       dtype: Any, precision: Any = None) -> jax.Array:
    """Each example's ``s_k (x A_k) B_k`` with ``k = ids[i]``; ``x`` (B, ..., in), stacks from ``stacked_factors``."""
    check_batch_size(ids, x)
    x = x.astype(dtype)
    h = jnp.einsum("b...i,bir->b...r", x, a[ids].astype(dtype), precision=precision)
    out = jnp.einsum("b...r,bro->b...o", h, b[ids].astype(dtype), precision=precision)
    return out * _per_example(scaling, ids, out.ndim).astype(dtype)


def mixed_embedding_branch(tokens: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, *,
                           dtype: Any) -> jax.Array:
    """Each example's ``s_k A_k[tokens] B_k`` for integer ``tokens`` (B, ...), shape (B, ..., features)."""
    check_batch_size(ids, tokens)
    example = ids.reshape((ids.shape[0],) + (1,) * (tokens.ndim - 1))
    rows = a.astype(dtype)[example, tokens]  # (B, ..., r)
    out = jnp.einsum("b...r,bro->b...o", rows, b[ids].astype(dtype))
    return out * _per_example(scaling, ids, out.ndim).astype(dtype)
