"""Parameter counts: how many numbers LoRA trains, without allocating the model.

Counts read only ``.shape``, so they work on ``jax.ShapeDtypeStruct`` trees from
``jax.eval_shape``: GPT-2 small can be counted without its 124M floats.

Example:
    >>> import numpy as np
    >>> from lora_jax.config import LoraConfig
    >>> params = {"a": {"kernel": np.zeros((10, 20)), "bias": np.zeros(20)}}
    >>> count_params(params)
    220
    >>> lora_param_count(params, LoraConfig(rank=2, target_modules=["a"]))
    60
    >>> lora_param_count(params, LoraConfig(rank=2, target_modules=["a"], rank_pattern={"a": 3}))
    90
    >>> lora_param_count(params, LoraConfig(rank=2, target_modules=["a"], use_dora=True))
    80
    >>> from lora_jax.adapter import Adapter
    >>> adapter = Adapter({"a": {"lora_A": np.zeros((10, 2)), "lora_B": np.zeros((2, 20))}}, LoraConfig(rank=2, target_modules=["a"]))
    >>> count_params(adapter)
    60
    >>> trainable_summary(params, adapter)
    {'trainable': 60, 'total': 280, 'ratio': 0.21428571428571427}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.initialize import factor_shapes
from lora_jax.nf4 import NF4Tensor, quantize_nf4


def count_params(tree: Any) -> int:
    """The number of scalars in a pytree of arrays or ``ShapeDtypeStruct`` (a Python number counts 1).

    An ``Adapter`` counts its arrays; its config is static data, not counted. An ``NF4Tensor`` (a QLoRA
    base) counts the values it stands for, not its bytes of codes and statistics.

    >>> count_params({"kernel": quantize_nf4(np.zeros((8, 64), np.float32))})
    512
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda leaf: isinstance(leaf, NF4Tensor))
    return sum(math.prod(getattr(leaf, "shape", ())) for leaf in leaves)


def lora_param_count(params: Mapping[str, Any], config: LoraConfig) -> int:
    """Trainable LoRA scalars ``sum r * (in + out)`` over the modules ``config`` targets, each at its own rank.

    ``params`` may be a QLoRA base (NF4 kernels). DoRA adds each module's magnitude vector, ``out`` more scalars.

    Raises:
        ValueError: As ``lora_jax.initialize.factor_shapes``.
    """
    dora = 1 if config.use_dora else 0
    return sum(rank * (fan_in + fan_out) + dora * fan_out for fan_in, fan_out, rank in factor_shapes(params, config).values())


def trainable_summary(frozen: Any, adapter: Any) -> dict[str, float]:
    """``{"trainable", "total", "ratio"}`` for a frozen tree plus its adapter (the tutorial's numbers)."""
    trainable = count_params(adapter)
    total = count_params(frozen) + trainable
    return {"trainable": trainable, "total": total, "ratio": trainable / total if total else 0.0}
