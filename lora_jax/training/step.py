"""Optax training that updates only the LoRA tree.

Two ways to train, both leaving the base weights bit-identical:

- ``make_train_step(loss_fn, tx)``: the preferred path. The frozen params and the ``Adapter`` are
  separate arguments and ``jax.value_and_grad`` differentiates the adapter only, so no
  gradient of a base weight is ever computed and ``tx`` keeps state for LoRA leaves only. The
  adapter's config is static pytree data: it rides through the step untouched.
- ``lora_optimizer(tx)``: for code that keeps one combined tree (``combine(frozen, lora)``).
  It routes LoRA leaves to ``tx`` and every other leaf to ``optax.set_to_zero()`` with
  ``optax.partition``, so frozen leaves get zero updates and no optimizer state.

Never freeze with ``optax.masked(tx, trainable_mask(full))`` alone: ``masked`` passes the
updates of masked-out leaves through *unchanged*, so each frozen weight moves by its raw
gradient at every step: ``apply_updates`` adds the raw gradient, an unscaled step *up* the
loss. ``masked`` only skips the inner transformation (and its state) for those leaves.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lora_jax import Adapter, LoraConfig
    >>> def loss_fn(adapter, frozen, batch, rng):
    ...     a, b = adapter.modules()[("w",)]
    ...     return jnp.sum((batch @ (frozen["w"]["kernel"] + adapter.scaling(("w",)) * a @ b)) ** 2)
    >>> frozen = {"w": {"kernel": jnp.eye(2)}}
    >>> adapter = Adapter({"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}}, LoraConfig(rank=1, alpha=1.0, target_modules=["w"]))
    >>> step = make_train_step(loss_fn, optax.sgd(0.01), donate=False)
    >>> opt_state = optax.sgd(0.01).init(adapter)
    >>> adapter, opt_state, metrics = step(adapter, opt_state, frozen, jnp.ones((1, 2)), jax.random.key(0))
    >>> float(metrics["loss"]), [round(float(x), 2) for x in adapter.weights["w"]["lora_B"][0]], adapter.config.alpha
    (18.0, [0.88, 0.88], 1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.partition import trainable_labels

LossFn = Callable[[Any, Any, Any, jax.Array], jax.Array]
TrainStep = Callable[[Any, Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, in float32 (``optax.global_norm`` is deprecated)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, donate: bool = True) -> TrainStep:
    """A jitted ``step(adapter, opt_state, frozen, batch, rng) -> (adapter, opt_state, metrics)``.

    Args:
        loss_fn: ``loss_fn(adapter, frozen, batch, rng) -> scalar`` (e.g. ``lm_loss(model)``);
            differentiated w.r.t. ``adapter`` only. Any pytree works as the adapter.
        tx: The optax optimizer; its state comes from ``tx.init(adapter)``.
        donate: Donate the ``adapter`` and ``opt_state`` buffers to the step, so XLA updates them
            in place; the arrays passed in are then invalid after the call.

    Returns:
        The step. ``metrics`` holds ``loss`` and ``grad_norm`` (global L2 norm of the LoRA gradient).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(adapter, frozen, batch, rng), got {loss_fn!r}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation (e.g. optax.adamw(1e-4)), got {tx!r}.")

    def step(adapter: Any, opt_state: Any, frozen: Any, batch: Any, rng: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        return adapter, opt_state, {"loss": loss, "grad_norm": global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the LoRA leaves of a combined tree, zero updates and no state for the rest.

    Built with ``optax.partition`` and ``optax.set_to_zero()``. This is the safe way to freeze
    within one tree; ``optax.masked(tx, mask)`` alone is not (see the module docstring): it would
    pass the frozen leaves' raw gradients through as their updates.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> full = {"m": {"kernel": jnp.ones((2, 2)), "lora_A": jnp.ones((2, 1))}}
        >>> tx = lora_optimizer(optax.sgd(1.0))
        >>> updates, _ = tx.update(full, tx.init(full), full)
        >>> updates["m"]["kernel"].tolist(), updates["m"]["lora_A"].tolist()
        ([[0.0, 0.0], [0.0, 0.0]], [[-1.0], [-1.0]])
    """
    # optax.partition is the newer name of multi_transform (optax >= 0.2.5).
    partition = getattr(optax, "partition", None) or optax.multi_transform
    return partition({"lora": tx, "frozen": optax.set_to_zero()}, trainable_labels)


def make_combined_train_step(
    loss_fn: Callable[[Any, Any, jax.Array], jax.Array], tx: optax.GradientTransformation, *, donate: bool = True
) -> Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]:
    """A jitted ``step(full, opt_state, batch, rng)`` over one combined tree, frozen via ``lora_optimizer``.

    Simpler to wire into code that holds one tree. XLA prunes the base-weight gradients that
    ``set_to_zero`` discards, so FLOPs match ``make_train_step`` (docs/lora_cost.md), but the
    whole tree goes in and comes out of the step, which about doubles the state memory.

    Args:
        loss_fn: ``loss_fn(full, batch, rng) -> scalar``.
        tx: The optimizer for the LoRA leaves; wrap nothing yourself, this calls ``lora_optimizer``.
            Initialise the state with ``lora_optimizer(tx).init(full)``.
        donate: Donate ``full`` and ``opt_state``. ``combine`` shares the frozen arrays with the
            params it was given, so donating a combined tree invalidates those params too.
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation, got {tx!r}.")
    frozen_tx = lora_optimizer(tx)

    def step(full: Any, opt_state: Any, batch: Any, rng: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(full, batch, rng)
        updates, opt_state = frozen_tx.update(grads, opt_state, full)
        return optax.apply_updates(full, updates), opt_state, {"loss": loss}

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
