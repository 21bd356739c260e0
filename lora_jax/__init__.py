"""LoRA as a functional transform of Flax parameter pytrees, plus a Flax GPT-2.

The core is model-agnostic: ``init_lora`` builds a LoRA tree mirroring the targeted
``nn.Dense`` kernels, ``lora_apply`` adds ``s * (x A) B`` to those layers by intercepting their
calls, ``make_train_step`` differentiates only the LoRA tree, ``merge`` folds it into the
kernels, and ``save_adapter``/``load_adapter`` speak PEFT's adapter format. The GPT-2 side
(``GPT2``, ``load_gpt2``, ``generate``, ``ensure_base``...), the chunked losses and the mesh
entry points of ``lora_jax.training.sharding`` (``make_mesh``, ``shard_train_step``...) are exported
lazily, so ``import lora_jax`` only loads the core.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lora_jax
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
    >>> model, x = MLP(), jnp.ones((1, 4))
    >>> params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(rank=2, alpha=4.0, target_modules=["hidden", "out"])
    >>> adapter = lora_jax.init_lora(params, config, jax.random.key(1))  # arrays + their config
    >>> lora_jax.count_params(adapter)
    44
    >>> forward = jax.jit(lora_jax.lora_apply(model.apply))
    >>> bool(jnp.array_equal(forward(params, adapter, x), jax.jit(model.apply)({"params": params}, x)))  # B = 0
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_jax.adapter import Adapter
from lora_jax.adapter_set import BASE_NAME, AdapterSet
from lora_jax.combination import add_weighted_adapter
from lora_jax.config import LoraConfig
from lora_jax.counting import count_params, lora_param_count, trainable_summary
from lora_jax.forward import lora_apply, lora_branch, lora_interception
from lora_jax.initialize import a_init_bound, init_lora
from lora_jax.loraplus import loraplus_optimizer
from lora_jax.merge import dora_weight_norms, lora_delta, merge, unmerge
from lora_jax.nf4 import NF4Tensor, quantize_nf4
from lora_jax.qlora import dequantize_params, quantize_params
from lora_jax.partition import combine, split, trainable_labels, trainable_mask
from lora_jax.targets import dotted_name, resolve_targets
from lora_jax.training.losses import Batch, lm_loss, next_token_loss
from lora_jax.training.step import lora_optimizer, make_combined_train_step, make_train_step

# Names from modules that are heavier or optional load on first use (PEP 562).
_LAZY = {
    **dict.fromkeys(("adapter_config_dict", "load_adapter", "load_adapters", "peft_state_dict", "save_adapter",
                     "save_adapters"), "lora_jax.peft_format"),
    **dict.fromkeys(
        ("GPT2", "GPT2Config", "KVCache", "gpt2_medium", "gpt2_small", "gpt2_xl", "init_cache", "init_gpt2_params"),
        "lora_jax.gpt2.model",
    ),
    **dict.fromkeys(("load_gpt2", "save_gpt2"), "lora_jax.gpt2.loading"),
    "generate": "lora_jax.gpt2.generation",
    **dict.fromkeys(("chunked_cross_entropy", "chunked_next_token_loss"), "lora_jax.training.chunked_loss"),
    **dict.fromkeys(("ensure_base", "load_tokenizer"), "lora_jax.embedded.base"),
    # The entry points of a sharded run; the partition-spec rules stay in lora_jax.training.sharding.
    **dict.fromkeys(
        ("make_mesh", "place_train_state", "shard_batch", "shard_train_step", "train_shardings"),
        "lora_jax.training.sharding",
    ),
}

if TYPE_CHECKING:  # what the lazy names are, for editors and type checkers
    from lora_jax.embedded.base import ensure_base, load_tokenizer
    from lora_jax.gpt2.generation import generate
    from lora_jax.gpt2.loading import load_gpt2, save_gpt2
    from lora_jax.gpt2.model import (GPT2, GPT2Config, KVCache, gpt2_medium, gpt2_small, gpt2_xl, init_cache,
                                     init_gpt2_params)
    from lora_jax.peft_format import (adapter_config_dict, load_adapter, load_adapters, peft_state_dict, save_adapter,
                                      save_adapters)
    from lora_jax.training.chunked_loss import chunked_cross_entropy, chunked_next_token_loss
    from lora_jax.training.sharding import (make_mesh, place_train_state, shard_batch, shard_train_step,
                                            train_shardings)

__all__ = [
    "BASE_NAME",
    "Adapter",
    "AdapterSet",
    "Batch",
    "LoraConfig",
    "NF4Tensor",
    "a_init_bound",
    "add_weighted_adapter",
    "combine",
    "count_params",
    "dequantize_params",
    "dora_weight_norms",
    "dotted_name",
    "init_lora",
    "lm_loss",
    "lora_apply",
    "lora_branch",
    "lora_delta",
    "lora_interception",
    "lora_optimizer",
    "lora_param_count",
    "loraplus_optimizer",
    "make_combined_train_step",
    "make_train_step",
    "merge",
    "next_token_loss",
    "quantize_nf4",
    "quantize_params",
    "resolve_targets",
    "split",
    "trainable_labels",
    "trainable_mask",
    "trainable_summary",
    "unmerge",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
