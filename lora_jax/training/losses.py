"""One batch convention and one loss builder, for training, evaluation and pre-training.

A ``Batch`` holds ``input_ids`` (B, T) and an optional ``mask`` (B, T) of 0/1, where 1 marks a
real token. The loss shifts inside: position ``t`` predicts ``input_ids[:, t + 1]``, and a
prediction counts when its target is a real token (``mask[:, t + 1]``). ``lm_loss`` builds the
``loss_fn(adapter, frozen, batch, rng)`` that ``make_train_step`` takes, with the full logits or
with the chunked LM head (``chunk_size=``), which gives the same value without ever holding the
(B, T, V) logits.

Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
    >>> round(float(next_token_loss(logits, jnp.array([[0, 1, 2]]))), 4)  # log 4
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax.forward import lora_apply
from lora_jax.training.chunked_loss import chunked_next_token_loss
from lora_jax.training.step import LossFn


class Batch(NamedTuple):
    """Token ids and an optional real-token mask; a pytree, so it jits and shards.

    Attributes:
        input_ids: (B, T) integer token ids.
        mask: Optional (B, T) 0/1 mask; 0 marks padding, whose targets do not count.
        adapter_ids: Optional (B,) ints for a mixed batch over an ``AdapterSet``: example ``i`` trains
            adapter ``adapter_ids[i]`` (``AdapterSet.example_ids(names)``; the set's size means none).

    >>> Batch(jnp.zeros((2, 5), jnp.int32)).mask is None
    True
    """

    input_ids: jax.Array
    mask: jax.Array | None = None
    adapter_ids: jax.Array | None = None


def next_token_loss(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of ``logits[:, t]`` against ``input_ids[:, t + 1]``, in float32.

    Args:
        logits: (B, T, V) scores, any float dtype (upcast to float32 first).
        input_ids: (B, T) integer token ids.
        mask: Optional (B, T) 0/1 mask of real tokens; padding targets are ignored.

    Returns:
        A float32 scalar; 0 when no target is real.

    Raises:
        ValueError: The shapes disagree.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and input_ids (B, T) with the same B, T; got {logits.shape} and {input_ids.shape}."
        )
    if mask is not None and mask.shape != input_ids.shape:
        raise ValueError(f"mask must have the shape of input_ids {input_ids.shape}, got {mask.shape}.")
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
    )  # (B, T-1)
    weights = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(jnp.float32)
    # A batch of only padding gives 0 instead of 0/0.
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def check_batch(batch: Any) -> Batch:
    """``batch`` itself when it is a ``Batch`` of (B, T) ids; a TypeError naming the fix otherwise.

    >>> check_batch({"input_ids": jnp.zeros((1, 2), jnp.int32)})
    Traceback (most recent call last):
    ...
    TypeError: batch must be a lora_jax.Batch(input_ids, mask=None), got dict; wrap it as lora_jax.Batch(**batch).
    """
    if not isinstance(batch, Batch):
        hint = "lora_jax.Batch(**batch)" if isinstance(batch, dict) else "lora_jax.Batch(input_ids, mask)"
        raise TypeError(
            f"batch must be a lora_jax.Batch(input_ids, mask=None), got {type(batch).__name__}; wrap it as {hint}."
        )
    if getattr(batch.input_ids, "ndim", None) != 2:
        raise ValueError(f"Batch.input_ids must be (B, T) token ids, got shape {getattr(batch.input_ids, 'shape', None)}.")
    return batch


def lm_loss(model: Any, *, chunk_size: int | None = None) -> LossFn:
    """The next-token ``loss_fn(adapter, frozen, batch, rng)`` for a Flax language model.

    ``adapter`` is an ``Adapter`` (differentiated by ``make_train_step``), an ``AdapterSet`` (its
    active adapters, or a mixed batch through ``Batch.adapter_ids``), or None for the base model
    alone (pre-training differentiates ``frozen`` instead). ``rng`` feeds LoRA dropout;
    None disables it.

    Args:
        model: A Flax module whose ``apply`` maps (B, T) ids to (B, T, V) logits, e.g.
            ``lora_jax.GPT2``.
        chunk_size: None for the full logits; an int computes the loss through the tied LM head
            in chunks of that many tokens (``lora_jax.training.chunked_loss``), which needs a
            ``GPT2`` (its ``hidden`` method and tied ``wte``). The chunked path does not
            differentiate the tied embedding, so it is for LoRA training, not pre-training. For
            LoRA training pass ``chunk_size=DEFAULT_CHUNK_SIZE`` (256, from ``chunked_loss``), as the
            main job does: it is the faster path on CPU (docs/performance.md) and never holds the logits.

    Raises:
        TypeError: ``model`` has no ``apply``, or ``chunk_size`` is set for a model without a tied head.

    Example:
        >>> import jax
        >>> from lora_jax.config import LoraConfig
        >>> from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
        >>> from lora_jax.initialize import init_lora
        >>> gpt = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        >>> params = init_gpt2_params(gpt, jax.random.key(0))
        >>> adapter = init_lora(params, LoraConfig(rank=2, target_modules=["c_attn"]), jax.random.key(1))
        >>> batch = Batch(jnp.arange(10).reshape(2, 5) % 11)
        >>> full, chunked = lm_loss(GPT2(gpt)), lm_loss(GPT2(gpt), chunk_size=4)
        >>> bool(jnp.allclose(full(adapter, params, batch, None), chunked(adapter, params, batch, None), atol=1e-5))
        True
    """
    apply_fn = getattr(model, "apply", None)
    if not callable(apply_fn):
        raise TypeError(f"lm_loss needs a Flax module with .apply (e.g. lora_jax.GPT2), got {type(model).__name__}.")
    forward = lora_apply(apply_fn)
    if chunk_size is None:
        def loss_fn(adapter: Any, frozen: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
            batch = check_batch(batch)
            logits = forward(frozen, adapter, batch.input_ids, dropout_rng=rng, adapter_names=batch.adapter_ids)
            return next_token_loss(logits, batch.input_ids, batch.mask)

        return loss_fn
    if not callable(getattr(model, "hidden", None)):
        raise TypeError(
            f"lm_loss(chunk_size=...) needs a model with a tied LM head and a hidden() method (lora_jax.GPT2), "
            f"got {type(model).__name__}; use chunk_size=None for other models."
        )

    def chunked_loss_fn(adapter: Any, frozen: Any, batch: Batch, rng: jax.Array | None) -> jax.Array:
        batch = check_batch(batch)
        hidden = forward(frozen, adapter, batch.input_ids, dropout_rng=rng, method="hidden",
                         adapter_names=batch.adapter_ids)  # (B, T, D)
        embedding = _tied_embedding(frozen)  # the tied head; frozen under LoRA
        return chunked_next_token_loss(hidden, embedding, batch.input_ids, batch.mask, chunk_size=chunk_size)

    return chunked_loss_fn


def _tied_embedding(frozen: Any) -> jax.Array:
    try:
        return frozen["transformer"]["wte"]["embedding"]
    except (KeyError, TypeError):
        raise ValueError(
            "lm_loss(chunk_size=...) reads the tied LM head at params['transformer']['wte']['embedding'], as in "
            "lora_jax.GPT2, and these params have none; use chunk_size=None for this model."
        ) from None


def eval_loss(loss_fn: Callable[..., jax.Array]) -> Callable[[Any, Any, Batch], jax.Array]:
    """``loss_fn`` without dropout, for evaluation: ``fn(adapter, frozen, batch)``.

    >>> eval_loss(lambda a, f, b, rng: rng)(None, None, None) is None
    True
    """
    return lambda adapter, frozen, batch: loss_fn(adapter, frozen, batch, None)
