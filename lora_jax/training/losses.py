"""Language-model losses, and the ``loss_fn(lora, frozen, batch, rng)`` that training takes.

A batch is a dict: ``{"input_ids": (B, T) ints}`` plus an optional ``"mask"`` (B, T) of 0/1,
where 1 marks a real token. Position ``t`` predicts ``input_ids[:, t + 1]``; a prediction
counts when its target is a real token (``mask[:, t + 1]``), the same rule as
``lora_jax.training.chunked_loss``.

Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
    >>> round(float(next_token_loss(logits, jnp.array([[0, 1, 2]]))), 4)  # log 4
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoraConfig
from lora_jax.forward import lora_apply
from lora_jax.training.step import LossFn


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


def batch_fields(batch: Any) -> tuple[jax.Array, jax.Array | None]:
    """``(input_ids, mask or None)`` of a batch dict; a clear TypeError for anything else.

    >>> batch_fields({"input_ids": jnp.zeros((1, 2), jnp.int32)})[1] is None
    True
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "batch must be a dict with 'input_ids' (B, T) and optionally 'mask' (B, T); "
            f"got {type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}."
        )
    return batch["input_ids"], batch.get("mask")


def causal_lm_loss(apply_fn: Callable[..., jax.Array], config: LoraConfig) -> LossFn:
    """``loss_fn(lora, frozen, batch, rng)`` for any model whose ``apply`` maps ids to logits.

    Args:
        apply_fn: ``model.apply``, called as ``apply_fn({"params": frozen}, input_ids)``
            and returning (B, T, V) logits.
        config: The LoRA config; ``rng`` feeds its dropout (pass None to the loss to disable).
    """
    forward = lora_apply(apply_fn, config)

    def loss_fn(lora: Any, frozen: Any, batch: Any, rng: jax.Array | None) -> jax.Array:
        input_ids, mask = batch_fields(batch)
        logits = forward(frozen, lora, input_ids, dropout_rng=rng)
        return next_token_loss(logits, input_ids, mask)

    return loss_fn


def gpt2_lm_loss(model: Any, config: LoraConfig) -> LossFn:
    """``causal_lm_loss`` for this project's ``lora_jax.gpt2.model.GPT2``.

    Example:
        >>> import jax
        >>> from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
        >>> from lora_jax.initialize import init_lora
        >>> gpt = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        >>> params = init_gpt2_params(gpt, jax.random.key(0))
        >>> lora_config = LoraConfig(rank=2, target_modules=["c_attn"])
        >>> lora = init_lora(params, lora_config, jax.random.key(1))
        >>> loss_fn = gpt2_lm_loss(GPT2(gpt), lora_config)
        >>> loss = jax.eval_shape(loss_fn, lora, params, {"input_ids": jnp.zeros((2, 5), jnp.int32)}, None)
        >>> loss.shape, str(loss.dtype)
        ((), 'float32')
    """
    from lora_jax.gpt2.model import GPT2  # the model module is only needed for this helper

    if not isinstance(model, GPT2):
        raise TypeError(
            f"gpt2_lm_loss needs a lora_jax.gpt2.model.GPT2, got {type(model).__name__}; "
            "for another Flax model use causal_lm_loss(model.apply, config)."
        )
    return causal_lm_loss(model.apply, config)
