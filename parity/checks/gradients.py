"""Stage 4: the loss and its gradients w.r.t. every A and B agree on the same batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.adapted import AdaptedPair, nonzero_b_row
from parity.results import StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import flat_leaves, jax_lora_to_named, torch_lora_grads


def torch_loss(adapted: AdaptedPair, model: Any, input_ids: np.ndarray):
    """transformers' own causal-LM loss (mean cross-entropy of shifted targets) as a torch scalar."""
    ids = adapted.pair.torch_ids(input_ids)
    with adapted.pair.torch_autocast():
        return model(ids, labels=ids).loss.float()


def jax_loss_fn(adapted: AdaptedPair):
    """``loss_fn(lora, params, batch, rng)`` built from the pair's ``jax_lora_apply`` and ``next_token_loss``."""
    from lora_jax import next_token_loss

    pair = adapted.pair
    forward = pair.impl.jax_lora_apply(pair.jax_module().apply, adapted.config)

    def loss_fn(lora: Any, params: Any, batch: Any, rng: Any) -> Any:
        del rng  # dropout is 0 in parity runs: random masks cannot match across frameworks
        return next_token_loss(forward(params, lora, batch["input_ids"]), batch["input_ids"])

    return loss_fn


def check_gradients(adapted: AdaptedPair, input_ids: np.ndarray) -> StageResult:
    """Compares the loss and d loss / d(A, B) for every adapted module."""
    import jax
    import jax.numpy as jnp

    pair, model = adapted.pair, adapted.torch_model
    model.zero_grad(set_to_none=True)
    loss_t = torch_loss(adapted, model, input_ids)
    loss_t.backward()
    grads_t = torch_lora_grads(model)
    model.zero_grad(set_to_none=True)
    batch = {"input_ids": jax.device_put(jnp.asarray(input_ids, jnp.int32), pair.placement.jax_device)}
    key = ("loss_and_grad", pair.dtype, pair.impl.jax_lora_apply, adapted.config)
    loss_and_grad = pair.compiled(key, lambda: jax.jit(jax.value_and_grad(jax_loss_fn(adapted))))
    loss_j, grads = loss_and_grad(adapted.lora, pair.jax_params, batch, None)
    grads_j = flat_leaves(jax_lora_to_named(grads))
    rows = [
        nonzero_b_row("gradients", adapted.lora),
        compare_arrays("gradients", "loss torch vs JAX", float(loss_t.detach()), float(loss_j),
                       tolerance_for("train_loss", pair.dtype)),
        compare_named_arrays("gradients", "dL/dA, dL/dB torch vs JAX (worst tensor)", grads_t, grads_j,
                             tolerance_for("grads", pair.dtype)),
    ]
    return StageResult(rows)
