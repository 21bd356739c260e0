"""One combined tree versus a frozen tree plus a LoRA tree, and back.

The combined form keeps ``lora_A``/``lora_B`` beside ``kernel``/``bias`` in each adapted
module, which is what a single-tree optimizer (``lora_optimizer``) or a checkpoint of the
whole model wants. ``split`` and ``combine`` are exact inverses on plain nested dicts.

Example:
    >>> import numpy as np
    >>> frozen = {"dense": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}}
    >>> lora = {"dense": {"lora_A": np.ones((3, 1)), "lora_B": np.zeros((1, 2))}}
    >>> full = combine(frozen, lora)
    >>> sorted(full["dense"])
    ['bias', 'kernel', 'lora_A', 'lora_B']
    >>> trainable_mask(full)["dense"]
    {'bias': False, 'kernel': False, 'lora_A': True, 'lora_B': True}
    >>> f2, l2 = split(full)
    >>> sorted(f2["dense"]), sorted(l2["dense"])
    (['bias', 'kernel'], ['lora_A', 'lora_B'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.adapter import Adapter
from lora_jax.lora_tree import LEAF_NAMES


def split(full: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separates the LoRA leaves from a combined tree.

    Args:
        full: A nested dict whose adapted modules hold ``lora_A`` and ``lora_B`` leaves (and DoRA's
            ``lora_magnitude_vector``).

    Returns:
        ``(frozen, lora)``: ``frozen`` keeps every other leaf and the full nesting (empty
        modules included); ``lora`` keeps only the branches that lead to LoRA leaves.
    """
    frozen: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    for key, value in full.items():
        if key in LEAF_NAMES:
            lora[key] = value
        elif isinstance(value, Mapping):
            sub_frozen, sub_lora = split(value)
            frozen[key] = sub_frozen
            if sub_lora:
                lora[key] = sub_lora
        else:
            frozen[key] = value
    return frozen, lora


def combine(frozen: Mapping[str, Any], lora: Any) -> dict[str, Any]:
    """Puts the LoRA leaves back beside the frozen leaves of their modules.

    Args:
        frozen: The base params tree.
        lora: An ``Adapter`` or a bare LoRA tree (e.g. from ``split``) whose every path exists
            in ``frozen``. The combined tree holds arrays only; keep the adapter's config to
            rebuild it: ``Adapter(split(full)[1], config)``.

    Returns:
        A new nested dict (new dicts, the same leaf arrays); neither input is modified.

    Raises:
        ValueError: A LoRA path does not exist in ``frozen``, or a key would be overwritten.
    """
    weights = lora.weights if isinstance(lora, Adapter) else lora
    return _combine(frozen, weights, ())


def _combine(frozen: Mapping[str, Any], lora: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    full: dict[str, Any] = {}
    for key, value in frozen.items():
        # Rebuild every nested dict so that the result shares no dict with `frozen`.
        full[key] = _combine(value, {}, (*path, key)) if isinstance(value, Mapping) else value
    for key, value in lora.items():
        where = ".".join((*path, key))
        if key in LEAF_NAMES:
            if key in frozen:
                raise ValueError(f"{where!r} already exists in the frozen tree; was it combined twice?")
            full[key] = value
        elif isinstance(frozen.get(key), Mapping) and isinstance(value, Mapping):
            full[key] = _combine(frozen[key], value, (*path, key))
        else:
            raise ValueError(
                f"LoRA path {where!r} has no matching module in the frozen tree; the LoRA tree must "
                "come from init_lora/load_adapter on these params."
            )
    return full


def trainable_mask(full: Any) -> Any:
    """A bool tree over ``full``: True exactly at ``lora_A``/``lora_B``/``lora_magnitude_vector`` leaves.

    Works on any pytree whose dict keys name the leaves (nested dicts, FrozenDicts).
    """

    def is_lora_leaf(path: tuple[Any, ...], _: Any) -> bool:
        last = path[-1] if path else None
        return isinstance(last, jax.tree_util.DictKey) and last.key in LEAF_NAMES

    return jax.tree_util.tree_map_with_path(is_lora_leaf, full)


def trainable_labels(full: Any) -> Any:
    """``"lora"`` at LoRA leaves and ``"frozen"`` elsewhere: the labels ``optax.partition`` takes.

    >>> trainable_labels({"m": {"kernel": 0.0, "lora_A": 0.0}})
    {'m': {'kernel': 'frozen', 'lora_A': 'lora'}}
    """
    return jax.tree_util.tree_map(lambda trainable: "lora" if trainable else "frozen", trainable_mask(full))
