"""The adapter value: LoRA arrays and the config they were made with, as one pytree.

An ``Adapter`` holds ``weights``, a nested dict that mirrors the adapted modules' paths
(``{...path...: {"lora_A": (in, r), "lora_B": (r, out)}}``, see ``lora_jax.lora_tree``), and
``config``, the ``LoraConfig`` that made them. The arrays are the pytree's leaves and the config
is static data, so an adapter goes through ``jax.jit``, ``jax.grad``, optax and sharding like
any tree of arrays, and every function that needs the scale reads it from the adapter itself:
a merge with an alpha other than the one trained with cannot happen silently.

The scale is asked per module (``Adapter.scaling``): the config's ``rank_pattern`` and
``alpha_pattern`` give modules their own rank and alpha, as in PEFT. The value is built to grow:
a variant's extra leaves sit beside ``lora_A`` and ``lora_B`` in the module's dict; several named
adapters are a mapping of such values; the frozen base (plain or quantized) is never part of it.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.config import LoraConfig
    >>> config = LoraConfig(rank=1, alpha=2.0, target_modules=["dense"])
    >>> adapter = Adapter({"dense": {"lora_A": jnp.ones((3, 1)), "lora_B": jnp.zeros((1, 2))}}, config)
    >>> [leaf.shape for leaf in jax.tree_util.tree_leaves(adapter)]
    [(3, 1), (1, 2)]
    >>> doubled = jax.tree_util.tree_map(lambda x: 2 * x, adapter)
    >>> doubled.config is config, float(doubled.weights["dense"]["lora_A"][0, 0])
    (True, 2.0)
    >>> adapter.scaling(("dense",)), list(adapter.modules())
    (2.0, [('dense',)])
    >>> varied = LoraConfig(rank=1, alpha=2.0, target_modules=["dense"], rank_pattern={"dense": 2},
    ...                     alpha_pattern={"dense": 8})
    >>> Adapter({}, varied).rank(("enc", "dense")), Adapter({}, varied).scaling(("enc", "dense"))
    (2, 4.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.config import LoraConfig
from lora_jax.lora_tree import LORA_MAGNITUDE, ModulePath, embedding_paths, lora_modules, magnitudes
from lora_jax.targets import dotted_name


@dataclasses.dataclass(frozen=True)
class Adapter:
    """LoRA weights for one model, with the ``LoraConfig`` they were made with.

    Build one with ``init_lora`` or ``load_adapter``; wrap a tree you already hold with
    ``Adapter(weights, config)``. A pytree: ``weights`` are its children and ``config`` is
    static (it must be hashable, which ``LoraConfig`` is).

    Attributes:
        weights: ``{...module path...: {"lora_A": (in, r), "lora_B": (r, out)}}``.
        config: The config the weights were made with.
    """

    weights: Mapping[str, Any]
    config: LoraConfig

    def modules(self) -> dict[ModulePath, tuple[Any, Any]]:
        """``{module_path: (A, B)}`` in tree order.

        Raises:
            ValueError: A module dict does not hold exactly ``lora_A`` and ``lora_B``.
        """
        return lora_modules(self.weights)

    def embeddings(self) -> tuple[ModulePath, ...]:
        """The paths of the adapted embeddings (``lora_embedding_A``/``_B`` modules), in tree order."""
        return embedding_paths(self.weights)

    def magnitudes(self) -> dict[ModulePath, Any]:
        """``{module_path: m}``: DoRA's magnitude vectors (out,), empty for plain LoRA."""
        return magnitudes(self.weights)

    def scaling(self, path: ModulePath) -> float:
        """The factor ``s`` of ``s * (x A) B`` for the module at ``path``, from its own rank and alpha.

        ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), where ``config.rank_pattern`` and
        ``config.alpha_pattern`` may give this module values other than ``config.rank`` and ``config.alpha``.
        """
        return self.config.module_scaling(dotted_name(path))

    def rank(self, path: ModulePath) -> int:
        """The rank the config gives the module at ``path`` (``config.rank_pattern``'s first match, else ``rank``)."""
        return self.config.module_rank(dotted_name(path))


jax.tree_util.register_dataclass(Adapter, data_fields=["weights"], meta_fields=["config"])


def checked_modules(adapter: Any) -> dict[ModulePath, tuple[Any, Any]]:
    """The adapter's modules, after checking that it is an ``Adapter`` whose shapes fit its config.

    Reads static shapes only, so it also works on tracers inside ``jit``.

    Raises:
        TypeError: ``adapter`` is not an ``Adapter`` (a bare LoRA tree, or a config passed in its place).
        ValueError: A module's ``A``/``B`` shapes disagree with the rank of the config, or its DoRA
            magnitude is missing (``config.use_dora``), present without it, or not of shape (out,).

    >>> import numpy as np
    >>> cfg = LoraConfig(rank=2, target_modules=["m"])
    >>> checked_modules(Adapter({"m": {"lora_A": np.zeros((3, 1)), "lora_B": np.zeros((1, 3))}}, cfg))
    Traceback (most recent call last):
    ...
    ValueError: LoRA module 'm' has A (3, 1) and B (1, 3), but its config says rank 2: the weights and the config do not belong together. Keep the config the weights were made with (init_lora and load_adapter return both in one Adapter).
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"expected a lora_jax.Adapter, got {type(adapter).__name__}. A bare LoRA tree carries no config; "
            "wrap it as lora_jax.Adapter(weights, config) with the config it was made with."
        )
    modules = adapter.modules()
    for path, (a, b) in modules.items():
        rank = adapter.rank(path)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise ValueError(
                f"LoRA module {dotted_name(path)!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but its config "
                f"says rank {rank}: the weights and the config do not belong together. Keep the config the "
                "weights were made with (init_lora and load_adapter return both in one Adapter)."
            )
    _check_magnitudes(adapter, modules)
    return modules


def _check_magnitudes(adapter: Adapter, modules: Mapping[ModulePath, tuple[Any, Any]]) -> None:
    found = adapter.magnitudes()
    if adapter.config.use_dora and len(found) != len(modules):
        missing = [dotted_name(p) for p in modules if p not in found]
        raise ValueError(f"the config says use_dora=True but LoRA modules {missing[:4]} have no {LORA_MAGNITUDE!r}; "
                         "build DoRA adapters with init_lora or load_adapter, which add it.")
    if not adapter.config.use_dora and found:
        raise ValueError(f"LoRA modules {[dotted_name(p) for p in found][:4]} hold a DoRA {LORA_MAGNITUDE!r} but "
                         "the config says use_dora=False; keep the config the weights were made with.")
    for path, m in found.items():
        out = modules[path][1].shape[1]
        if tuple(m.shape) != (out,):
            raise ValueError(f"DoRA magnitude of {dotted_name(path)!r} has shape {tuple(m.shape)}, but its B "
                             f"{tuple(modules[path][1].shape)} needs ({out},): one entry per output feature.")
