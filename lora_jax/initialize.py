"""A fresh LoRA tree: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` and ``B = 0``, or PEFT's other fresh inits.

``LoraConfig.init_lora_weights`` picks PEFT's option (``peft/tuners/lora/layer.py``,
``reset_lora_parameters``), in this project's (in, r) / (r, out) layout:

- ``True``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``B = 0`` (below);
- ``"gaussian"``: ``A ~ N(0, (1/r)^2)``, ``B = 0``;
- ``False``: ``A`` as for ``True`` and ``B ~ U(-1/sqrt(r), 1/sqrt(r))``, the default init of
  PEFT's ``lora_B`` ``nn.Linear(r, out)`` that PEFT leaves in place. The adapter is then not the
  identity, which is what tests of merging and of PEFT interchange need.

An embedding (``nn.Embed``) gets PEFT's embedding init instead: ``A = 0`` and ``B ~ N(0, 1)`` for
``True`` and ``"gaussian"``, both ``N(0, 1)`` for ``False``; A is (num_embeddings, r), B (r, features).

A DoRA config also gets ``lora_magnitude_vector = ||W0 + s A B||_c`` (``lora_jax.dora``), so
``init_lora`` reads the kernels' values, not only their shapes, when ``use_dora`` is on.

The bound is PEFT's: ``nn.init.kaiming_uniform_(a=sqrt(5))`` on a ``(r, in)`` weight has fan-in
``in`` and gives ``bound = 1/sqrt(in)``. A tutorial variant that applies kaiming to the
``(in, r)`` tensor uses fan-in ``r`` and gets an ``A`` about ``sqrt(in / r)`` times larger
(about 10x for GPT-2 small at r=8). ``lora_torch`` uses the same bound as this module.
With ``B = 0`` the branch adds exact zeros, so the adapted model starts out computing the base
model (to the last bit op by op; under ``jit`` XLA may fuse the two programs differently, ~1 ulp).

Example:
    >>> import jax, numpy as np
    >>> from lora_jax.config import LoraConfig
    >>> params = {"encoder": {"query": {"kernel": np.zeros((16, 8)), "bias": np.zeros(8)}}}
    >>> adapter = init_lora(params, LoraConfig(rank=2, target_modules=["query"]), jax.random.key(0))
    >>> a, b = adapter.weights["encoder"]["query"]["lora_A"], adapter.weights["encoder"]["query"]["lora_B"]
    >>> a.shape, b.shape, str(a.dtype), bool(abs(a).max() <= 0.25), float(abs(b).max())
    ((16, 2), (2, 8), 'float32', True, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.delta import lora_delta
from lora_jax.nf4 import NF4Tensor
from lora_jax.qlora import float_shapes
from lora_jax.lora_tree import EMBEDDING_A, EMBEDDING_B, LORA_A, LORA_B, LORA_MAGNITUDE, ModulePath, get_module, nest
from lora_jax.targets import dotted_name, is_embedding, target_kernel_shapes


def a_init_bound(fan_in: int) -> float:
    """PEFT's uniform bound for ``A``: ``1 / sqrt(in)``.

    >>> a_init_bound(64)
    0.125
    """
    return 1.0 / math.sqrt(fan_in)


def factor_shapes(params: Mapping[str, Any], config: LoraConfig) -> dict[ModulePath, tuple[int, int, int]]:
    """``{path: (in, out, rank)}`` for each module ``config`` targets, with the module's own rank.

    The rank is ``config.rank`` unless ``config.rank_pattern`` gives the module another one
    (PEFT's rule, ``lora_format.patterns``); ``A`` is (in, rank) and ``B`` is (rank, out).

    Raises:
        ValueError: As ``resolve_targets``, or a module's rank exceeds ``min(in, out)``.

    >>> import numpy as np
    >>> params = {"q": {"kernel": np.zeros((8, 8))}, "v": {"kernel": np.zeros((8, 4))}}
    >>> factor_shapes(params, LoraConfig(rank=2, target_modules=["q", "v"], rank_pattern={"v": 3}))
    {('q',): (8, 8, 2), ('v',): (8, 4, 3)}
    """
    shapes = {}
    # A QLoRA base's NF4 kernels hold the (out, in) weight; the factors follow the (in, out) kernel.
    for path, (fan_in, fan_out) in target_kernel_shapes(float_shapes(params), config).items():
        rank = config.module_rank(dotted_name(path))
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"rank_pattern gives module {dotted_name(path)!r} rank {rank}, more than min(in, out) = "
                f"{min(fan_in, fan_out)} of its kernel ({fan_in}, {fan_out}); lower that pattern's rank."
            )
        shapes[path] = (fan_in, fan_out, rank)
    return shapes


def init_lora(params: Mapping[str, Any], config: LoraConfig, key: jax.Array) -> Adapter:
    """Creates the adapter for every module ``config`` targets in ``params``.

    Each module gets its own key, split from ``key`` in tree order, so the result depends
    only on ``key``, the config and the module names.

    Args:
        params: A Flax params pytree; only kernel shapes are read, so ``ShapeDtypeStruct``
            leaves work under ``jax.eval_shape``. A QLoRA base (NF4 kernels, ``quantize_params`` or
            ``load_gpt2(..., quantize="nf4")``) works as it is; DoRA dequantizes its kernels for the norms.
        config: Which modules to adapt, and each module's rank (``rank``, or ``rank_pattern``'s).
        key: A ``jax.random.key``.

    Returns:
        An ``Adapter`` carrying ``config``, whose weights are
        ``{...path...: {"lora_A": (in, r) float32, "lora_B": (r, out) float32 zeros}}``, with
        each module's own ``r`` (``B`` random with ``init_lora_weights=False``), plus
        ``"lora_magnitude_vector": (out,)`` with ``use_dora``.

    Raises:
        TypeError: ``key`` is not a JAX key (e.g. a plain int seed).
        ValueError: As ``factor_shapes``; raised before any array is created.
    """
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a JAX PRNG key such as jax.random.key(0), got {type(key).__name__}.")
    shapes = factor_shapes(params, config)
    keys = jax.random.split(key, len(shapes))
    entries = {}
    for (path, (fan_in, fan_out, rank)), module_key in zip(shapes.items(), keys):
        if is_embedding(get_module(params, path)):
            entries[path] = dict(zip((EMBEDDING_A, EMBEDDING_B),
                                     fresh_embedding_factors(module_key, fan_in, fan_out, rank, config.init_lora_weights)))
            continue
        a, b = fresh_factors(module_key, fan_in, fan_out, rank, config.init_lora_weights)
        entries[path] = {LORA_A: a, LORA_B: b}
        if config.use_dora:
            kernel = get_module(params, path)["kernel"]
            if isinstance(kernel, NF4Tensor):
                kernel = kernel.dequantize().T
            entries[path][LORA_MAGNITUDE] = jnp.linalg.norm(
                jnp.asarray(kernel, jnp.float32) + lora_delta(a, b, config.module_scaling(dotted_name(path))), axis=0)
    return Adapter(nest(entries), config)


def fresh_embedding_factors(key: jax.Array, num_embeddings: int, features: int, rank: int, init: bool | str = True
                            ) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` float32 for an embedding, PEFT's way: ``A = 0``, ``B ~ N(0, 1)`` (both N(0, 1) when ``init`` is False).

    >>> a, b = fresh_embedding_factors(jax.random.key(0), 50, 8, 2)
    >>> a.shape, b.shape, float(abs(a).max()), float(abs(b).max()) > 0
    ((50, 2), (2, 8), 0.0, True)
    """
    b = jax.random.normal(jax.random.fold_in(key, 1), (rank, features), jnp.float32)
    if init is False:
        return jax.random.normal(key, (num_embeddings, rank), jnp.float32), b
    return jnp.zeros((num_embeddings, rank), jnp.float32), b


def fresh_factors(key: jax.Array, fan_in: int, fan_out: int, rank: int, init: bool | str = True
                  ) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` float32 for one module under PEFT's ``init_lora_weights`` option (module docstring).

    >>> a, b = fresh_factors(jax.random.key(0), 64, 8, 4, "gaussian")
    >>> a.shape, b.shape, float(abs(b).max())
    ((64, 4), (4, 8), 0.0)
    >>> float(abs(fresh_factors(jax.random.key(0), 64, 8, 4, False)[1]).max()) > 0
    True
    """
    if init == "gaussian":
        a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
    else:
        bound = a_init_bound(fan_in)
        a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
    if init is False:
        bound = 1.0 / math.sqrt(rank)
        b = jax.random.uniform(jax.random.fold_in(key, 1), (rank, fan_out), jnp.float32, -bound, bound)
    else:
        b = jnp.zeros((rank, fan_out), jnp.float32)
    return a, b
