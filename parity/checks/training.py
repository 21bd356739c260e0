"""Stage 5: the same AdamW recipe on the same batches moves A and B the same way in both halves."""

from __future__ import annotations

import copy

import numpy as np

from parity.adapted import AdaptedPair
from parity.checks.gradients import jax_batch, jax_loss_fn, torch_loss
from parity.optimizers import TrainSettings, lr_schedule
from parity.results import StageResult, compare_arrays, compare_named_arrays
from parity.tolerances import tolerance_for
from parity.transfer import adapter_to_named, flat_leaves, torch_lora_to_named


def train_torch(adapted: AdaptedPair, batches: list[np.ndarray], settings: TrainSettings) -> tuple[list, dict]:
    """The tutorial's loop on a copy: loss, backward, clip, AdamW step; lr set from the shared schedule.

    Returns:
        ``(losses, {dotted name: (A, B)})`` after ``len(batches)`` steps.
    """
    import torch
    from lora_torch import lora_parameters

    model = copy.deepcopy(adapted.torch_model)
    params = [param for _, param in lora_parameters(model)]
    optimizer = adapted.pair.impl.torch_optimizer(params, settings)
    schedule, losses = lr_schedule(settings), []
    for step, ids in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step))
        optimizer.zero_grad(set_to_none=True)
        loss = torch_loss(adapted, model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, torch_lora_to_named(model)


def train_jax(adapted: AdaptedPair, batches: list[np.ndarray], settings: TrainSettings) -> tuple[list, dict]:
    """``lora_jax.make_train_step`` (gradients of the adapter only) with the optax recipe."""
    import jax
    from lora_jax import make_train_step

    pair = adapted.pair
    tx = pair.impl.jax_optimizer(settings)
    key = ("train_step", pair.dtype, pair.impl.jax_lora_apply, pair.impl.jax_optimizer, settings)
    step_fn = pair.compiled(key, lambda: make_train_step(jax_loss_fn(pair), tx, donate=False))
    adapter, losses = adapted.adapter, []
    opt_state = tx.init(adapter)
    for ids in batches:
        adapter, opt_state, metrics = step_fn(adapter, opt_state, pair.jax_params, jax_batch(pair, ids),
                                              jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return losses, adapter_to_named(adapter)


def _updates(final: dict, start: dict) -> dict[str, np.ndarray]:
    before = flat_leaves(start)
    return {key: value - before.get(key, 0.0) for key, value in flat_leaves(final).items()}


def check_training(adapted: AdaptedPair, batches: list[np.ndarray], settings: TrainSettings) -> StageResult:
    """Trains both halves ``len(batches)`` steps from the same A, B; compares losses and the moves of A, B.

    The parameters are compared as their change from the shared start (final - initial): the
    start is identical by construction, and comparing the totals would hide update errors
    behind the size of A.
    """
    start = adapter_to_named(adapted.adapter)
    torch_losses, torch_final = train_torch(adapted, batches, settings)
    jax_losses, jax_final = train_jax(adapted, batches, settings)
    dtype = adapted.pair.dtype
    rows = [
        compare_arrays("training", f"loss trajectory ({len(batches)} AdamW steps)", np.array(torch_losses),
                       np.array(jax_losses), tolerance_for("train_loss", dtype),
                       detail=f"loss {jax_losses[0]:.4f} -> {jax_losses[-1]:.4f}"),
        compare_named_arrays("training", "final A, B minus start (worst tensor)", _updates(torch_final, start),
                             _updates(jax_final, start), tolerance_for("train_update", dtype)),
    ]
    return StageResult(rows, {"torch_losses": np.array(torch_losses, np.float32),
                              "jax_losses": np.array(jax_losses, np.float32)})


def default_settings(steps: int) -> TrainSettings:
    """The recipe the suite uses: lr 1e-2 peak, warmup 2, cosine, betas (0.9, 0.999), eps 1e-8, wd 0.01, clip 1."""
    return TrainSettings(steps=steps, warmup_steps=min(2, steps - 1))

