"""Stage 4: the loss and its gradients w.r.t. every A and B agree on the same batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.adapted import AdaptedPair, nonzero_b_row
from parity.pair import ModelPair
from parity.results import StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named, flat_leaves, torch_lora_grads


def torch_loss(adapted: AdaptedPair, model: Any, input_ids: np.ndarray):
    """transformers' own causal-LM loss (mean cross-entropy of shifted targets) as a torch scalar."""
    ids = adapted.pair.torch_ids(input_ids)
    with adapted.pair.torch_autocast():
        return model(ids, labels=ids).loss.float()


def jax_loss_fn(pair: ModelPair):
    """``loss_fn(adapter, params, batch, rng)`` built from the pair's ``jax_lora_apply`` and ``next_token_loss``.

    The same function as ``lora_jax.lm_loss(model)``, but with the forward taken from ``pair.impl``, so a
    planted ``jax_lora_apply`` reaches the loss, the gradients and the training step too.
    """
    from lora_jax import next_token_loss
    from lora_jax.training.losses import check_batch

    forward = pair.impl.jax_lora_apply(pair.jax_module().apply)

    def loss_fn(adapter: Any, params: Any, batch: Any, rng: Any) -> Any:
        del rng  # dropout is 0 in parity runs: random masks cannot match across frameworks
        batch = check_batch(batch)
        return next_token_loss(forward(params, adapter, batch.input_ids), batch.input_ids, batch.mask)

    return loss_fn


def jax_batch(pair: ModelPair, input_ids: np.ndarray) -> Any:
    """``input_ids`` as a ``lora_jax.Batch`` of int32 ids on the pair's JAX device (no padding mask)."""
    import jax
    import jax.numpy as jnp
    from lora_jax import Batch

    return Batch(jax.device_put(jnp.asarray(input_ids, jnp.int32), pair.placement.jax_device))


def check_gradients(adapted: AdaptedPair, input_ids: np.ndarray) -> StageResult:
    """Compares the loss and d loss / d(A, B) for every adapted module."""
    import jax

    pair, model = adapted.pair, adapted.torch_model
    model.zero_grad(set_to_none=True)
    loss_t = torch_loss(adapted, model, input_ids)
    loss_t.backward()
    grads_t = torch_lora_grads(model)
    model.zero_grad(set_to_none=True)
    key = ("loss_and_grad", pair.dtype, pair.impl.jax_lora_apply)
    loss_and_grad = pair.compiled(key, lambda: jax.jit(jax.value_and_grad(jax_loss_fn(pair))))
    loss_j, grads = loss_and_grad(adapted.adapter, pair.jax_params, jax_batch(pair, input_ids), None)
    grads_j = flat_leaves(adapter_to_named(grads))  # the gradient of an Adapter is an Adapter
    rows = [
        nonzero_b_row("gradients", adapted.adapter),
        compare_arrays("gradients", "loss torch vs JAX", float(loss_t.detach()), float(loss_j),
                       tolerance_for("train_loss", pair.dtype)),
        compare_named_arrays("gradients", "dL/dA, dL/dB torch vs JAX (worst tensor)", grads_t, grads_j,
                             tolerance_for("grads", pair.dtype)),
    ]
    return StageResult(rows)
