"""Autoregressive decoding for the Flax GPT-2 with a KV cache, compiled end to end.

The prompt is run once to fill the cache (prefill); each new token then costs one
single-position forward pass inside a ``lax.fori_loop``, so the whole generation is one
XLA program. Greedy decoding (``temperature=0``) picks the argmax, exactly like
transformers' ``generate(do_sample=False)``; sampling divides logits by ``temperature`` and
optionally keeps only the ``top_k`` most likely tokens.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
    >>> config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    >>> params = init_gpt2_params(config, jax.random.key(0))
    >>> generate(GPT2(config), params, jnp.array([[1, 2]]), max_new_tokens=3).shape
    (1, 5)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.gpt2.model import GPT2, KVCache, init_cache

# (params, input_ids (B, T), cache) -> (fp32 logits (B, T, V), new cache)
ApplyFn = Callable[[Any, jax.Array, KVCache], tuple[jax.Array, KVCache]]


def generate(
    model: GPT2,
    params: Any,
    prompt_ids: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    apply_fn: ApplyFn | None = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens.

    Args:
        model: The GPT-2 module; its config bounds the length and its dtype sets the cache's.
        params: Its parameter tree (the value under ``"params"``), or whatever ``apply_fn`` takes.
        prompt_ids: (B, T) integer ids, T >= 1, no padding (all prompts the same length).
        max_new_tokens: Tokens to add; T + max_new_tokens must not exceed ``n_positions``.
        temperature: 0 for greedy decoding, > 0 to sample from ``softmax(logits / temperature)``.
        top_k: With sampling, keep only the k most likely tokens.
        key: PRNG key, required when sampling.
        eos_token_id: Once a row emits it, the rest of that row is filled with it (as
            transformers does when the pad token is the EOS token).
        apply_fn: Replaces ``model.apply``, e.g. to decode through a LoRA forward:
            ``lambda p, ids, cache: lora_forward(p[0], p[1], ids, cache=cache)``. Pass the same
            function object across calls to reuse the compiled program.

    Returns:
        (B, T + max_new_tokens) int32 ids: the prompt followed by the new tokens.

    Raises:
        ValueError: Bad shapes, lengths, temperature, top_k or a missing key; raised before tracing.
    """
    prompt_ids = jnp.asarray(prompt_ids)
    _validate(model, prompt_ids, max_new_tokens, temperature, top_k, key, eos_token_id)
    if max_new_tokens == 0:
        return prompt_ids.astype(jnp.int32)
    key = jax.random.key(0) if key is None else key  # unused by greedy decoding
    return _decode(
        apply_fn,
        model,
        max_new_tokens,
        temperature > 0,
        top_k,
        -1 if eos_token_id is None else eos_token_id,
        params,
        prompt_ids.astype(jnp.int32),
        jnp.asarray(max(temperature, 1e-6), jnp.float32),
        key,
    )


def _model_apply(model: GPT2) -> ApplyFn:
    def apply(params: Any, ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return model.apply({"params": params}, ids, cache=cache)

    return apply


def _validate(model, prompt_ids, max_new_tokens, temperature, top_k, key, eos_token_id) -> None:
    config = model.config
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(
            f"prompt_ids must be a non-empty (batch, time) integer array, got shape {prompt_ids.shape} "
            f"and dtype {prompt_ids.dtype}; add a batch axis with ids[None]."
        )
    # Embedding lookups clamp out-of-range ids silently, so check them here while they are concrete.
    if int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= config.vocab_size:
        raise ValueError(
            f"prompt_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
            f"[{int(prompt_ids.min())}, {int(prompt_ids.max())}]; was it encoded with this model's tokenizer?"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    total = prompt_ids.shape[1] + max_new_tokens
    if total > config.n_positions:
        raise ValueError(
            f"prompt ({prompt_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"n_positions={config.n_positions}; shorten the prompt or generate fewer tokens."
        )
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}.")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= config.vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {config.vocab_size}], got {top_k!r}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(seed).")
    if eos_token_id is not None and not 0 <= eos_token_id < config.vocab_size:
        raise ValueError(f"eos_token_id must be in [0, {config.vocab_size}), got {eos_token_id!r}.")


def top_k_logits(logits: jax.Array, k: int) -> jax.Array:
    """Sets every logit below the k-th largest of its row to -inf.

    >>> top_k_logits(jnp.array([[1.0, 3.0, 2.0]]), 2).tolist()
    [[-inf, 3.0, 2.0]]
    """
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (B, 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def _next_token(logits, key, *, sample, top_k, temperature):
    """Picks one token per row from (B, V) fp32 logits."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _decode(apply_fn, model, max_new_tokens, sample, top_k, eos, params, prompt, temperature, key):
    b, t = prompt.shape
    # Resolved here, not by the caller, so the default stays one static argument (None) and
    # repeated calls hit the compilation cache.
    apply_fn = _model_apply(model) if apply_fn is None else apply_fn
    pick = functools.partial(_next_token, sample=sample, top_k=top_k, temperature=temperature)
    cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
    logits, cache = apply_fn(params, prompt, cache)  # prefill: (B, T, V)
    keys = jax.random.split(key, max_new_tokens)
    first = pick(logits[:, -1], keys[0])  # (B,)
    out = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)  # (B, T + N)
    out = out.at[:, t].set(first)
    done = first == eos  # (B,)

    def step(i, carry):
        out, cache, done = carry
        previous = jax.lax.dynamic_slice_in_dim(out, t + i - 1, 1, axis=1)  # (B, 1)
        logits, cache = apply_fn(params, previous, cache)  # (B, 1, V)
        token = pick(logits[:, 0], keys[i])
        token = jnp.where(done, eos, token)  # finished rows repeat EOS
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], t + i, axis=1)
        return out, cache, done | (token == eos)

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, done))
    return out
