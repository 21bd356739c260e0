"""DoRA (weight-decomposed LoRA) as PEFT 0.21 computes it, on (in, out) kernels.

DoRA splits the adapted weight ``V = W0 + s A B`` (in, out) into a direction and a learned
magnitude ``m`` (out,), one entry per output feature:

    W' = (m / ||V||_c) * V,      ||V||_c[j] = sqrt(sum_i V[i, j]^2)   (the column norm, per output)

The norm is detached from the gradient (DoRA paper, section 4.3; PEFT does the same), so A and B
get gradient only through ``V`` itself and ``m`` through the ratio. A layer's output is computed
factorised, as PEFT's ``DoraLinearLayer.forward`` does, never with ``W'``:

    y = base(x) + (f - 1) * (x W0) + f * s * (x A) B,      f = m / ||V||_c

where ``base(x) = x W0 + b``. With dropout active, PEFT applies it to ``x`` in both extra terms
(the ``x W0`` term is recomputed on the dropped input); this module does the same. ``m`` starts at
``||W0 + s A B||_c`` (``||W0||_c`` when ``B = 0``), so a fresh DoRA adapter computes the base model.

GPT-2's ``Conv1D`` and Flax's ``Dense`` both store (in, out) kernels, so the norm runs over axis 0;
PEFT transposes Conv1D weights to (out, in) (``fan_in_fan_out``) and takes ``dim=1``: the same
numbers. The norm is computed in float32 whatever the layer's dtype.

Example:
    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> weight_norm(kernel, jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0).tolist()
    [5.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.delta import lora_delta, lora_product


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``||W0 + s A B||_c`` (out,) in float32, detached from the gradient.

    >>> import jax
    >>> k, a, b = jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2))
    >>> jax.grad(lambda b: weight_norm(k, a, b, 1.0).sum())(b).tolist()  # detached: no gradient
    [[0.0, 0.0]]
    """
    v = jnp.asarray(kernel, jnp.float32) + lora_delta(a, b, scaling)
    return jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))


def dora_extra(
    y: jax.Array,
    x_branch: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    a: jax.Array,
    b: jax.Array,
    magnitude: jax.Array,
    scaling: float,
    *,
    dropped: bool,
    precision: Any = None,
) -> jax.Array:
    """What DoRA adds to the base layer's output ``y = x W0 + b``: ``(f - 1) * (x W0) + f * s * (x A) B``.

    Args:
        y: The base layer's output (..., out); its dtype is the computation dtype.
        x_branch: The input of the extra terms (..., in): ``x``, or ``dropout(x)`` when ``dropped``.
        kernel: ``W0`` (in, out).
        bias: The base bias (out,) or None.
        a: ``A`` (in, r).
        b: ``B`` (r, out).
        magnitude: ``m`` (out,).
        scaling: ``s``.
        dropped: ``x_branch`` is a dropped-out input, so ``x W0`` is recomputed on it (PEFT does);
            otherwise ``y - b`` is reused.
        precision: The layer's matmul precision.

    >>> k = jnp.array([[3.0, 0.0], [4.0, 1.0]]); x = jnp.array([[1.0, 1.0]]); a = jnp.zeros((2, 1)); b = jnp.zeros((1, 2))
    >>> dora_extra(x @ k, x, k, None, a, b, jnp.array([10.0, 1.0]), 1.0, dropped=False).tolist()  # m = 2 ||W0|| in column 0
    [[7.0, 0.0]]
    """
    dtype = y.dtype
    factor = (jnp.asarray(magnitude, jnp.float32) / weight_norm(kernel, a, b, scaling)).astype(dtype)
    x_branch = x_branch.astype(dtype)
    if dropped:
        base = jnp.matmul(x_branch, kernel.astype(dtype), precision=precision)
    else:
        base = y if bias is None else y - bias.astype(dtype)
    return (factor - 1) * base + factor * lora_product(x_branch, a, b, scaling, dtype=dtype, precision=precision)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scaling: float) -> jax.Array:
    """``(m / ||V||_c) * V`` with ``V = W0 + s A B``, float32 (in, out): the merged DoRA kernel.

    >>> k = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> merged_kernel(k, jnp.zeros((2, 1)), jnp.zeros((1, 2)), jnp.array([10.0, 1.0]), 1.0).tolist()
    [[6.0, 0.0], [8.0, 1.0]]
    """
    v = jnp.asarray(kernel, jnp.float32) + lora_delta(a, b, scaling)
    return v * (jnp.asarray(magnitude, jnp.float32) / jnp.linalg.norm(v, axis=0))


def unmerged_kernel(merged: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scaling: float,
                    norm: jax.Array) -> jax.Array:
    """``W0`` back from a merged kernel, given ``norm = ||W0 + s A B||_c`` taken before merging (float32).

    The merged kernel alone cannot give the norm back: its columns have norm ``|m|`` whatever
    ``||V||_c`` was. PEFT keeps it in a cache at merge time; here the caller keeps it
    (``lora_jax.merge.dora_weight_norms``).

    >>> k = jnp.array([[3.0, 0.0], [4.0, 1.0]]); a, b, m = jnp.zeros((2, 1)), jnp.zeros((1, 2)), jnp.array([10.0, 1.0])
    >>> unmerged_kernel(merged_kernel(k, a, b, m, 1.0), a, b, m, 1.0, jnp.array([5.0, 1.0])).tolist()
    [[3.0, 0.0], [4.0, 1.0]]
    """
    factor = jnp.asarray(magnitude, jnp.float32) / jnp.asarray(norm, jnp.float32)
    return jnp.asarray(merged, jnp.float32) / factor - lora_delta(a, b, scaling)
