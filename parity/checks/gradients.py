"""Stage 4: the loss and its gradients w.r.t. every A, B (and DoRA m) agree on the same batch, and with PEFT."""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.adapted import AdaptedPair, guard_rows
from parity.pair import ModelPair
from parity.peft_reference import peft_available, peft_grads, reference_rows
from parity.results import StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_leaves, torch_lora_grads


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


def backward_grads(adapted: AdaptedPair, model: Any, input_ids: np.ndarray, grads_of: Any) -> tuple[float, dict]:
    """``(loss, grads_of(model))`` after one backward pass of transformers' loss; the model's grads are cleared."""
    model.zero_grad(set_to_none=True)
    loss = torch_loss(adapted, model, input_ids)
    loss.backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def check_gradients(adapted: AdaptedPair, input_ids: np.ndarray) -> StageResult:
    """Compares the loss and d loss / d(A, B, DoRA's m) for every adapted module, torch and PEFT against JAX.

    DoRA's norm is detached in PEFT (DoRA section 4.3): a norm that is not detached changes dL/dA and
    dL/dB but no forward value, so the PEFT row is what catches it when both halves share the mistake.
    """
    import jax

    pair = adapted.pair
    loss_t, grads_t = backward_grads(adapted, adapted.torch_model, input_ids, torch_lora_grads)
    key = ("loss_and_grad", pair.dtype, pair.impl.jax_lora_apply)
    loss_and_grad = pair.compiled(key, lambda: jax.jit(jax.value_and_grad(jax_loss_fn(pair))))
    loss_j, grads = loss_and_grad(adapted.adapter, pair.jax_params, jax_batch(pair, input_ids), None)
    grads_j = adapter_leaves(grads)  # the gradient of an Adapter is an Adapter
    leaves = "dL/dA, dL/dB, dL/dm" if adapted.config.use_dora else "dL/dA, dL/dB"
    loss_tol, grads_tol = tolerance_for("train_loss", pair.dtype), tolerance_for("grads", pair.dtype)
    rows = [
        *guard_rows("gradients", adapted),
        compare_arrays("gradients", "loss torch vs JAX", loss_t, float(loss_j), loss_tol),
        compare_named_arrays("gradients", f"{leaves} torch vs JAX (worst tensor)", grads_t, grads_j, grads_tol),
    ]
    if peft_available():
        names = ("loss peft.PeftModel vs JAX", f"{leaves} peft.PeftModel vs JAX (worst tensor)")

        def peft_rows() -> list:
            loss_p, grads_p = backward_grads(adapted, adapted.peft_model, input_ids, peft_grads)
            return [compare_arrays("gradients", names[0], loss_p, float(loss_j), loss_tol),
                    compare_named_arrays("gradients", names[1], grads_p, grads_j, grads_tol)]

        rows += reference_rows("gradients", [(names[0], loss_tol), (names[1], grads_tol)], peft_rows)
    return StageResult(rows)
