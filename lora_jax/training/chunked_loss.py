"""Cross-entropy over a tied LM head that never holds the full logits.

A GPT-2 step over ``B x T`` tokens would otherwise build ``(B*T, V)`` float32 logits
(100 MB at 4 x 128 tokens, 3.3 GB at 16 x 1024) plus the same again for their gradient.
Here the tokens are cut into chunks of ``chunk_size`` rows, and each chunk's logits live only
inside one iteration of a ``lax.scan``.

The gradient is fused into the forward pass: since the loss is the last thing a train step
computes, each chunk's ``d loss / d hidden = (softmax - onehot) @ E`` is formed while that
chunk's logits are still in cache, and only this ``(B*T, D)`` result is kept for the backward
pass. The FLOP count therefore equals the unchunked loss (one head matmul forward, one
backward) instead of the 3 matmuls that ``jax.checkpoint`` around a chunk would cost.
Without differentiation the plain forward runs and no gradient work is done.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_cross_entropy", "chunked_next_token_loss"]

# Token rows per chunk. On a 2-core CPU the backward head matmul (chunk, V) x (V, D) runs at 70 GFLOP/s with
# 128 rows and at 100 with 256 or more (docs/performance.md); a (256, 50257) float32 block is 51 MB.
DEFAULT_CHUNK_SIZE = 256


def _validate(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights, chunk_size: int) -> None:
    """Raises on shape or dtype problems; runs on static shapes, before any tracing of the scan."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if embedding.ndim != 2:
        raise ValueError(f"embedding must be (vocab, hidden), got shape {embedding.shape}.")
    if hidden.ndim < 1 or hidden.shape[-1] != embedding.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal embedding's hidden size {embedding.shape[1]}, "
            f"got hidden shape {hidden.shape}; pass the post-ln_f hidden states and the tied wte."
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {hidden.shape[:-1]} (hidden without its last dim), got {targets.shape}.")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}.")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights must have the shape of targets {targets.shape}, got {weights.shape}.")


def _chunk_logits(h_cd: jax.Array, embedding: jax.Array) -> jax.Array:
    # float32 accumulation even for bf16 inputs; only one (chunk, V) block exists at a time.
    return jnp.einsum("cd,vd->cv", h_cd, embedding, preferred_element_type=jnp.float32)


def _softmax_nll(logits_cv: jax.Array, target_c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(nll, exp(logits - max), their row sums)`` of a chunk: the loss and, from the same exp, its gradient.

    The plain forward and the fused one both take the loss from here, so a step reports the value an
    evaluation computes.
    """
    max_c1 = jnp.max(logits_cv, axis=-1, keepdims=True)
    exp_cv = jnp.exp(logits_cv - max_c1)
    sum_c1 = jnp.sum(exp_cv, axis=-1, keepdims=True)
    target_logit_c = jnp.take_along_axis(logits_cv, target_c[:, None], axis=-1)[:, 0]
    return max_c1[:, 0] + jnp.log(sum_c1[:, 0]) - target_logit_c, exp_cv, sum_c1


def _split_chunks(hidden_nd, targets_n, weights_n, chunk_size):
    """Pads the token axis to a multiple of chunk_size (padding weight 0) and adds a chunk axis."""
    n = hidden_nd.shape[0]
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    if pad:
        hidden_nd = jnp.pad(hidden_nd, ((0, pad), (0, 0)))
        targets_n = jnp.pad(targets_n, (0, pad))
        weights_n = jnp.pad(weights_n, (0, pad))
    d = hidden_nd.shape[-1]
    return (
        hidden_nd.reshape(n_chunks, chunk_size, d),
        targets_n.reshape(n_chunks, chunk_size),
        weights_n.reshape(n_chunks, chunk_size),
    )


def _denominator(weights_n: jax.Array) -> jax.Array:
    # All-zero weights give a loss of 0 rather than NaN.
    return jnp.maximum(jnp.sum(weights_n), jnp.finfo(jnp.float32).tiny)


def _weighted_mean_nll(chunk_size, embedding_grad, hidden_nd, embedding, targets_n, weights_n):
    del embedding_grad  # only changes the backward pass
    h, t, w = _split_chunks(hidden_nd, targets_n, weights_n, chunk_size)

    def body(total, chunk):
        h_cd, t_c, w_c = chunk
        nll_c, _, _ = _softmax_nll(_chunk_logits(h_cd, embedding), t_c)
        return total + jnp.sum(w_c * nll_c), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total / _denominator(weights_n)


_fused = jax.custom_vjp(_weighted_mean_nll, nondiff_argnums=(0, 1))


def _fused_fwd(chunk_size, embedding_grad, hidden_nd, embedding, targets_n, weights_n):
    n = hidden_nd.shape[0]
    inv_denominator = 1.0 / _denominator(weights_n)
    h, t, w = _split_chunks(hidden_nd, targets_n, weights_n, chunk_size)

    def body(carry, chunk):
        total, d_embedding = carry
        h_cd, t_c, w_c = chunk
        logits_cv = _chunk_logits(h_cd, embedding)
        nll_c, exp_cv, sum_c1 = _softmax_nll(logits_cv, t_c)
        # d loss / d logits = (softmax - onehot(target)) * weight. The softmax part goes through the matmul;
        # the one-hot part is the target's embedding row, gathered, so no (chunk, V) one-hot is built.
        row_scale_c = w_c * inv_denominator
        d_softmax_cv = exp_cv * (row_scale_c[:, None] / sum_c1)
        d_h_cd = jnp.einsum("cv,vd->cd", d_softmax_cv.astype(embedding.dtype), embedding,
                            preferred_element_type=jnp.float32)
        d_h_cd = d_h_cd - row_scale_c[:, None] * jnp.take(embedding, t_c, axis=0).astype(jnp.float32)
        if embedding_grad:
            d_embedding = d_embedding + jnp.einsum(
                "cv,cd->vd", d_softmax_cv.astype(h_cd.dtype), h_cd, preferred_element_type=jnp.float32)
            d_embedding = d_embedding.at[t_c].add(-row_scale_c[:, None] * h_cd.astype(jnp.float32))
        return (total + jnp.sum(w_c * nll_c), d_embedding), d_h_cd.astype(h_cd.dtype)

    d_embedding0 = jnp.zeros(embedding.shape, jnp.float32) if embedding_grad else jnp.zeros((), jnp.float32)
    (total, d_embedding), d_h = jax.lax.scan(body, (jnp.zeros((), jnp.float32), d_embedding0), (h, t, w))
    d_hidden_nd = d_h.reshape(-1, hidden_nd.shape[-1])[:n]
    residuals = (d_hidden_nd, d_embedding.astype(embedding.dtype) if embedding_grad else None)
    return total * inv_denominator, residuals


def _fused_bwd(chunk_size, embedding_grad, residuals, g):
    del chunk_size
    d_hidden_nd, d_embedding = residuals
    d_embedding_out = (g * d_embedding).astype(d_embedding.dtype) if embedding_grad else None
    # targets and weights are data, not parameters: no cotangent.
    return (g.astype(d_hidden_nd.dtype) * d_hidden_nd, d_embedding_out, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embedding_grad: bool = False,
) -> jax.Array:
    """Weighted mean of ``-log softmax(hidden @ embedding.T)[target]`` without full logits.

    Args:
        hidden: ``(..., D)`` hidden states (post final LayerNorm), any float dtype.
        embedding: ``(V, D)`` output embedding (GPT-2's tied ``wte``).
        targets: integer ids with shape ``hidden.shape[:-1]``.
        weights: optional float weights of the same shape (a 0/1 mask); default all ones.
        chunk_size: token rows per chunk; one ``(chunk_size, V)`` float32 block exists at a time.
        embedding_grad: whether to compute the gradient for ``embedding``. ``False`` (LoRA
            training, where ``wte`` is frozen) treats it as a constant, like ``stop_gradient``,
            and saves one ``V x D`` matmul per chunk. Set ``True`` for full fine-tuning.

    Returns:
        A float32 scalar: ``sum(weights * nll) / sum(weights)`` (0 when all weights are 0).
        ``targets`` and ``weights`` receive no gradient.

    Example:
        >>> import jax.numpy as jnp
        >>> h = jnp.zeros((2, 3, 4)); e = jnp.zeros((5, 4)); t = jnp.zeros((2, 3), jnp.int32)
        >>> round(float(chunked_cross_entropy(h, e, t, chunk_size=4)), 4)  # uniform over 5: log 5
        1.6094
    """
    _validate(hidden, embedding, targets, weights, chunk_size)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    hidden_nd = hidden.reshape(-1, hidden.shape[-1])
    return _fused(chunk_size, bool(embedding_grad), hidden_nd, embedding,
                  targets.reshape(-1), weights.reshape(-1).astype(jnp.float32))


def chunked_next_token_loss(
    hidden: jax.Array,
    embedding: jax.Array,
    input_ids: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embedding_grad: bool = False,
) -> jax.Array:
    """Mean next-token loss: position ``t`` predicts ``input_ids[:, t + 1]``.

    The last position has no target and gets weight 0. Keeping all ``T`` positions (instead of
    slicing ``hidden[:, :-1]``) avoids a copy and keeps ``B*T`` a multiple of ``chunk_size``.

    Args:
        hidden: ``(B, T, D)`` post-ln_f hidden states.
        embedding: ``(V, D)`` tied output embedding.
        input_ids: ``(B, T)`` integer token ids.
        mask: optional ``(B, T)`` 0/1 mask of real tokens; a target counts when it is real.
        chunk_size: see :func:`chunked_cross_entropy`.
        embedding_grad: see :func:`chunked_cross_entropy`.

    Returns:
        A float32 scalar loss.

    Example:
        >>> import jax.numpy as jnp
        >>> h = jnp.zeros((1, 4, 2)); e = jnp.zeros((3, 2)); ids = jnp.array([[0, 1, 2, 1]])
        >>> round(float(chunked_next_token_loss(h, e, ids)), 4)  # log 3
        1.0986
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {input_ids.shape}.")
    if mask is not None and mask.shape != input_ids.shape:
        raise ValueError(f"mask must have the shape of input_ids {input_ids.shape}, got {mask.shape}.")
    targets = jnp.roll(input_ids, -1, axis=1)
    real = jnp.ones(input_ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    weights = jnp.roll(real, -1, axis=1).at[:, -1].set(0.0)
    return chunked_cross_entropy(hidden, embedding, targets, weights,
                                 chunk_size=chunk_size, embedding_grad=embedding_grad)
