"""LoRA+: B learns ``ratio`` times faster than A (Hayou et al., 2024, arXiv:2402.12354).

PEFT's ``peft.optimizers.create_loraplus_optimizer`` builds one torch parameter group per learning
rate; here the same rule is an ``optax.partition`` over labels read from the adapter's leaf names:
every ``lora_A`` leaf gets ``make_tx(lr)`` and every ``lora_B`` leaf ``make_tx(lr * ratio)``.
``make_tx`` builds the whole optimizer (weight decay included), so weight decay is decoupled per
group exactly as in torch's ``AdamW`` groups: B decays with its own, larger, learning rate.

PEFT's third group holds the LoRA of embeddings (both ``lora_embedding_A`` and ``_B``) at its own
``loraplus_lr_embedding`` (default 1e-6); ``embedding_lr`` is that rate here. DoRA's magnitude,
a 1-D parameter, goes with B, as in PEFT.

Example:
    >>> import jax.numpy as jnp, optax
    >>> from lora_jax import Adapter, LoraConfig
    >>> adapter = Adapter({"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}},
    ...                   LoraConfig(rank=1, alpha=1.0, target_modules=["w"]))
    >>> tx = loraplus_optimizer(optax.sgd, 0.1, ratio=16.0)
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, adapter), tx.init(adapter), adapter)
    >>> [round(float(leaf[0, 0]), 4) for leaf in jax.tree.leaves(updates)]  # A, then B: ratio x A's step
    [-0.1, -1.6]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["loraplus_labels", "loraplus_optimizer"]

# PEFT's create_loraplus_optimizer puts `"lora_B" in name or param.ndim == 1` in group B: DoRA's magnitude too.
_LABELS = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "B", "lora_embedding_A": "embedding",
           "lora_embedding_B": "embedding"}
EMBEDDING_LR = 1e-6  # PEFT's default loraplus_lr_embedding


def _label(path: tuple[Any, ...], _leaf: Any) -> str:
    last = path[-1] if path else None
    name = last.key if isinstance(last, jax.tree_util.DictKey) else None
    if name not in _LABELS:
        raise ValueError(
            f"LoRA+ labels leaves by their name ({', '.join(_LABELS)}); the leaf at {jax.tree_util.keystr(path)} is "
            "neither. Pass the lora_jax.Adapter (or its gradients), not a combined or frozen tree."
        )
    return _LABELS[name]


def loraplus_labels(adapter: Any) -> Any:
    """The tree of ``adapter`` with each leaf replaced by ``"A"`` (a ``lora_A``), ``"B"`` (a ``lora_B`` or DoRA
    magnitude) or ``"embedding"`` (an embedding's ``lora_embedding_A``/``_B``).

    Raises:
        ValueError: A leaf's key path does not end in one of those names.
    """
    return jax.tree_util.tree_map_with_path(_label, adapter)


def loraplus_optimizer(
    make_tx: Callable[[float], optax.GradientTransformation], lr: float, *, ratio: float,
    embedding_lr: float = EMBEDDING_LR,
) -> optax.GradientTransformation:
    """An optimizer that steps A at ``lr`` and B at ``lr * ratio``, as PEFT's LoRA+ does.

    Args:
        make_tx: Builds the optimizer for one learning rate, e.g.
            ``lambda lr: optax.adamw(lr, eps=1e-8, weight_decay=0.01)``. It is called twice.
        lr: The learning rate of the ``lora_A`` leaves (PEFT's ``lr``); > 0 and finite.
        ratio: ``lr_B / lr_A`` (PEFT's ``loraplus_lr_ratio``; the paper suggests 16); > 0 and finite.
        embedding_lr: The learning rate of embedding LoRA (PEFT's ``loraplus_lr_embedding``, default 1e-6).

    Returns:
        An ``optax.GradientTransformation`` over an ``Adapter``; its state comes from ``tx.init(adapter)``.

    Raises:
        ValueError: ``lr``, ``ratio`` or ``embedding_lr`` is not a finite positive number (checked here, before any tracing).
    """
    for name, value in (("lr", lr), ("ratio", ratio), ("embedding_lr", embedding_lr)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"loraplus_optimizer: {name} must be a finite number > 0, got {value!r}.")
    return optax.partition({"A": make_tx(float(lr)), "B": make_tx(float(lr) * float(ratio)),
                            "embedding": make_tx(float(embedding_lr))}, loraplus_labels)
