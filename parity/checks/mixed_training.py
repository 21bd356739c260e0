"""A few AdamW steps in a mixed batch: every adapter learns from its own rows, in JAX, lora_torch and PEFT.

PEFT refuses ``adapter_names`` in training mode and makes only the active adapter trainable, so its
reference runs the model in eval mode (parity runs have no dropout) with every adapter's factors set
trainable, under the same AdamW recipe (``parity.checks.training.default_settings``). The JAX side is
``lora_jax.make_train_step`` on an ``AdapterSet`` with ``Batch.adapter_ids``, its optimizer taken from
``pair.impl`` so a planted optimizer reaches it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from parity.peft_reference import peft_available, reference_rows
from parity.results import compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named

MIXED_STEPS = 3


def factor_leaves(model: Any, names: Sequence[str], peft: bool) -> dict[str, tuple[Any, bool]]:
    """``{"<adapter>/<module>.lora_A": (param, transposed), ...}`` of every named adapter's factors.

    ``transposed`` says the parameter is stored (r, in) / (out, r), PEFT's ``nn.Linear`` layout, so
    ``param.T`` is the (in, r) / (r, out) layout lora_jax and lora_torch share.
    """
    params = {}
    if peft:
        from parity.peft_reference import peft_layers

        for module, layer in peft_layers(model).items():
            for name in names:
                if name in layer.lora_A:
                    params[f"{name}/{module}.lora_A"] = (layer.lora_A[name].weight, True)
                    params[f"{name}/{module}.lora_B"] = (layer.lora_B[name].weight, True)
                elif name in layer.lora_embedding_A:
                    params[f"{name}/{module}.lora_A"] = (layer.lora_embedding_A[name], True)
                    params[f"{name}/{module}.lora_B"] = (layer.lora_embedding_B[name], True)
        return params
    from lora_torch import lora_wrappers

    for module, wrapper in lora_wrappers(model).items():
        for name, lora in wrapper.adapters.items():
            if name in names:
                params[f"{name}/{module}.lora_A"] = (lora.lora_A, False)
                params[f"{name}/{module}.lora_B"] = (lora.lora_B, False)
    return params


def as_numpy(params: dict[str, tuple[Any, bool]], grads: bool = False) -> dict[str, np.ndarray]:
    """The (in, r) / (r, out) float32 arrays of :func:`factor_leaves` (their ``.grad`` with ``grads``; None -> 0)."""
    out = {}
    for key, (p, transposed) in params.items():
        value = p.grad if grads else p
        array = np.zeros(tuple(p.shape), np.float32) if value is None else value.detach().float().cpu().numpy()
        out[key] = array.T if transposed else array
    return out


def torch_mixed_loss(many: Any, model: Any, ids: np.ndarray, names: list[str], peft: bool) -> Any:
    """transformers' causal-LM loss of a mixed batch: PEFT's ``adapter_names=`` or lora_torch's context manager."""
    import lora_torch

    x = many.pair.torch_ids(ids)
    if peft:
        return model(x, labels=x, adapter_names=names).loss
    with lora_torch.adapter_names(model, names):
        return model(x, labels=x).loss


def train_torch_mixed(many: Any, model: Any, batches: list[np.ndarray], names: list[str], peft: bool,
                      settings: Any) -> tuple[list[float], dict[str, np.ndarray]]:
    """The tutorial's loop on a copy of ``model``: every adapter's factors in one AdamW, clipped together."""
    import torch

    from parity.optimizers import lr_schedule

    model = copy.deepcopy(model)
    params = factor_leaves(model, many.names, peft)
    tensors = [p for p, _ in params.values()]
    for p in tensors:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(tensors, lr=settings.lr, betas=(settings.b1, settings.b2), eps=settings.eps,
                                  weight_decay=settings.weight_decay, foreach=False)
    schedule, losses = lr_schedule(settings), []
    for step, ids in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step))
        optimizer.zero_grad(set_to_none=True)
        loss = torch_mixed_loss(many, model, ids, names, peft)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tensors, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, as_numpy(params)


def jax_named_factors(adapter_set: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The same keys as :func:`factor_leaves` for a ``lora_jax.AdapterSet`` (or its gradients)."""
    out = {}
    for name in names:
        for module, (a, b) in adapter_to_named(adapter_set.adapters[name]).items():
            out[f"{name}/{module}.lora_A"], out[f"{name}/{module}.lora_B"] = np.asarray(a), np.asarray(b)
    return out


def train_jax_mixed(many: Any, batches: list[np.ndarray], names: list[str],
                    settings: Any) -> tuple[list[float], dict[str, np.ndarray]]:
    """``lora_jax.make_train_step`` on the ``AdapterSet``, each row routed by ``Batch.adapter_ids``."""
    import jax
    import jax.numpy as jnp
    from lora_jax import Batch, make_train_step, next_token_loss

    pair = many.pair
    forward = pair.impl.jax_lora_apply(pair.jax_module().apply)

    def loss_fn(adapter_set: Any, params: Any, batch: Any, rng: Any) -> Any:
        del rng  # no dropout in parity runs
        logits = forward(params, adapter_set, batch.input_ids, adapter_names=batch.adapter_ids)
        return next_token_loss(logits, batch.input_ids, None)

    tx = pair.impl.jax_optimizer(settings)
    step = make_train_step(loss_fn, tx, donate=False)
    adapter_set, losses = many.adapter_set, []
    opt_state = tx.init(adapter_set)
    example_ids = many.adapter_set.example_ids(names)
    for ids in batches:
        x = jax.device_put(jnp.asarray(ids, jnp.int32), pair.placement.jax_device)
        adapter_set, opt_state, metrics = step(adapter_set, opt_state, pair.jax_params,
                                               Batch(x, adapter_ids=example_ids), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return losses, jax_named_factors(adapter_set, many.names)


def _moves(final: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value - start[key] for key, value in final.items()}


def mixed_training_rows(many: Any, input_ids: np.ndarray, names: list[str], steps: int = MIXED_STEPS) -> list:
    """Loss trajectory and every adapter's move after ``steps`` AdamW steps on the mixed batch, vs torch and PEFT.

    The moves (final - start) are compared, not the totals, so an update error cannot hide behind |A|.
    """
    from parity.checks.training import default_settings

    settings = default_settings(steps)
    batches = [input_ids] * steps  # one batch, memorised: the loss visibly falls in three steps
    start = jax_named_factors(many.adapter_set, many.names)
    jax_losses, jax_final = train_jax_mixed(many, batches, names, settings)
    jax_moves = _moves(jax_final, start)
    torch_losses, torch_final = train_torch_mixed(many, many.torch_model, batches, names, False, settings)
    dtype = many.pair.dtype
    loss_tol, update_tol = tolerance_for("train_loss", dtype), tolerance_for("train_update", dtype)
    recipe = f"{steps} AdamW steps, mixed batch"
    rows = [compare_arrays("mixed_batch", f"mixed loss trajectory torch vs JAX ({recipe})", np.array(torch_losses),
                           np.array(jax_losses), loss_tol,
                           detail=f"loss {jax_losses[0]:.4f} -> {jax_losses[-1]:.4f}"),
            compare_named_arrays("mixed_batch", "mixed: every adapter's A, B minus start torch vs JAX (worst tensor)",
                                 _moves(torch_final, start), jax_moves, update_tol)]
    if peft_available():
        labels = (f"mixed loss trajectory peft vs JAX ({recipe})",
                  "mixed: every adapter's A, B minus start peft vs JAX (worst tensor)")

        def peft_rows() -> list:
            peft_losses, peft_final = train_torch_mixed(many, many.peft_model, batches, names, True, settings)
            return [compare_arrays("mixed_batch", labels[0], np.array(peft_losses), np.array(jax_losses), loss_tol),
                    compare_named_arrays("mixed_batch", labels[1], _moves(peft_final, start), jax_moves, update_tol)]

        rows += reference_rows("mixed_batch", [(labels[0], loss_tol), (labels[1], update_tol)], peft_rows)
    return rows
