"""Causal self-attention over a packed ``q|k|v`` projection, with a hand-written backward pass.

``causal_attention(qkv, n_head, scale)`` is what GPT-2's training forward runs. It computes what
``jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)`` computes (``q k^T`` accumulated and
kept in float32, the softmax in float32, the probabilities cast back to the compute dtype), with two
changes that make a CPU step cheaper (docs/performance.md):

- q, k and v are laid out ``(B, nh, T, hs)`` once, so the four batched matmuls of the backward pass need
  no further layout copies;
- the backward pass is written out (``jax.custom_vjp``) the way FlashAttention writes it: the softmax
  gradient takes its row sums from ``rowsum(dy * y)``, a ``(T, hs)`` product, instead of from the
  ``(T, T)`` product ``rowsum(dp * p)`` that autodiff forms. The two are equal:
  ``sum_s p_ts dp_ts = sum_s p_ts (dy_t . v_s) = dy_t . y_t``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> qkv = jax.random.normal(jax.random.key(0), (2, 5, 3 * 8))
    >>> q, k, v = (a.reshape(2, 5, 2, 4) for a in jnp.split(qkv, 3, axis=-1))
    >>> ref = jax.nn.dot_product_attention(q, k, v, scale=0.5, is_causal=True).reshape(2, 5, 8)
    >>> bool(jnp.allclose(causal_attention(qkv, 2, 0.5), ref, atol=1e-6))
    True
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

__all__ = ["causal_attention"]


def causal_attention(qkv: jax.Array, n_head: int, scale: float) -> jax.Array:
    """Causal multi-head attention of ``qkv`` (B, T, 3D), packed ``q | k | v`` as GPT-2's ``c_attn`` emits it.

    Args:
        qkv: (B, T, 3D) in the compute dtype.
        n_head: Number of heads; must divide D.
        scale: The factor ``q k^T`` is multiplied by (``GPT2Config.attention_scale``).

    Returns:
        (B, T, D) in the dtype of ``qkv``: each position attends to itself and the positions before it.
    """
    b, t, three_d = qkv.shape
    d = three_d // 3
    heads = qkv.reshape(b, t, 3, n_head, d // n_head)
    q, k, v = jnp.transpose(heads, (2, 0, 3, 1, 4))  # each (B, nh, T, hs)
    y = _attention(q, k, v, float(scale))  # (B, nh, T, hs)
    return jnp.transpose(y, (0, 2, 1, 3)).reshape(b, t, d)


def _causal_probs(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """float32 softmax of the scaled, causally masked scores, (B, nh, T, T)."""
    t = q.shape[-2]
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((t, t), bool))  # query t sees keys s <= t
    return jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    return _attention_fwd(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
    probs = _causal_probs(q, k, scale)
    y32 = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return y32.astype(v.dtype), (q, k, v, probs, y32)


def _attention_bwd(scale, residuals, dy):
    q, k, v, probs, y32 = residuals
    d_probs = jnp.einsum("bhtd,bhsd->bhts", dy, v, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bhts,bhtd->bhsd", probs.astype(dy.dtype), dy)
    row = jnp.sum(dy.astype(jnp.float32) * y32, axis=-1, keepdims=True)  # = rowsum(probs * d_probs)
    d_scores = (probs * (d_probs - row) * scale).astype(q.dtype)  # masked entries: probs = 0
    dq = jnp.einsum("bhts,bhsd->bhtd", d_scores, k)
    dk = jnp.einsum("bhts,bhtd->bhsd", d_scores, q)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
