"""Several named adapters on one frozen base, as one pytree: ``AdapterSet``.

An ``AdapterSet`` maps names to ``Adapter`` values (each with its own config: rank, alpha, targets
and rsLoRA may differ) and names the active ones. It is immutable: ``add``, ``remove`` and
``with_active`` return new sets and never touch the adapters they share. The adapters' arrays are
the leaves and the names are static, so a set jits, differentiates and shards like one adapter.

``lora_apply``'s forward takes a set in place of an adapter:

- without ``adapter_names``, the active adapters' branches are summed (as PEFT with several active
  adapters); with none active, the base model runs;
- with ``adapter_names`` (one name per example, ``"__base__"`` for none, as PEFT), example ``i`` uses
  adapter ``adapter_names[i]``: a mixed batch (``lora_jax.mixed_batch``).

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.config import LoraConfig
    >>> config = LoraConfig(rank=1, alpha=1.0, target_modules=["dense"])
    >>> one = Adapter({"dense": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 3))}}, config)
    >>> adapters = AdapterSet({"a": one}).add("b", one)
    >>> adapters.names, adapters.active, adapters.with_active("b").active
    (('a', 'b'), ('a',), ('b',))
    >>> adapters.example_ids(["b", "__base__", "a"]).tolist()
    [1, 2, 0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapter import Adapter, checked_modules

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name == BASE_NAME:
        raise ValueError(f"adapter names must be non-empty strings other than {BASE_NAME!r}, got {name!r}.")
    return name


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters and the names of the active ones.

    Attributes:
        adapters: ``{name: Adapter}`` in insertion order.
        active: The active names, in the order given; default the first adapter alone.
    """

    adapters: Mapping[str, Adapter]
    active: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        adapters = dict(self.adapters)
        for name, adapter in adapters.items():
            _check_name(name)
            checked_modules(adapter)  # a TypeError/ValueError naming the fix for anything but a valid Adapter
        object.__setattr__(self, "adapters", adapters)
        active = tuple(adapters)[:1] if self.active is None else tuple(self.active)
        object.__setattr__(self, "active", active)
        self._check_known(active, "active adapters")
        if len(set(active)) != len(active):
            raise ValueError(f"active adapters {list(active)} name one adapter twice.")

    @property
    def names(self) -> tuple[str, ...]:
        """The adapter names, in insertion order."""
        return tuple(self.adapters)

    def _check_known(self, names: Iterable[str], what: str) -> None:
        unknown = list(dict.fromkeys(n for n in names if n not in self.adapters))
        if unknown:
            raise ValueError(f"{what} {unknown} do not exist; this set holds {list(self.adapters)}.")

    def add(self, name: str, adapter: Adapter) -> AdapterSet:
        """A new set with ``adapter`` added as ``name`` (the active ones unchanged).

        Raises:
            ValueError: ``name`` exists already, or is not a valid name.
        """
        if _check_name(name) in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already; remove it first or choose another name.")
        return AdapterSet({**self.adapters, name: adapter}, self.active)

    def remove(self, name: str) -> AdapterSet:
        """A new set without ``name``; it is also dropped from the active ones.

        Raises:
            ValueError: ``name`` does not exist.
        """
        self._check_known([name], "adapters")
        return AdapterSet({n: a for n, a in self.adapters.items() if n != name},
                          tuple(n for n in self.active if n != name))

    def with_active(self, *names: str) -> AdapterSet:
        """A new set whose active adapters are ``names`` (none: the base model runs)."""
        return AdapterSet(self.adapters, names)

    def example_ids(self, adapter_names: Sequence[str]) -> jax.Array:
        """Per-example adapter indices for a mixed batch: ``names.index(n)``, and ``len(names)`` for ``"__base__"``.

        Raises:
            ValueError: A name does not exist (or ``adapter_names`` is a single string).
        """
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names must hold one name per example, got the string {adapter_names!r}.")
        names = list(adapter_names)
        self._check_known([n for n in names if n != BASE_NAME], "adapter_names")
        index = {name: i for i, name in enumerate(self.adapters)}
        return jnp.asarray(np.array([index.get(n, len(index)) for n in names], np.int32))


def _flatten(adapters: AdapterSet) -> tuple[tuple[Adapter, ...], tuple[tuple[str, ...], tuple[str, ...]]]:
    return tuple(adapters.adapters.values()), (adapters.names, adapters.active)


def _unflatten(aux: tuple[tuple[str, ...], tuple[str, ...]], children: Iterable[Any]) -> AdapterSet:
    # No validation: jax rebuilds trees whose leaves are not arrays (shardings, specs, tracers' placeholders).
    # Names are kept in their order; a dict child would be re-sorted by jax, moving every example id.
    names, active = aux
    rebuilt = object.__new__(AdapterSet)
    object.__setattr__(rebuilt, "adapters", dict(zip(names, children)))
    object.__setattr__(rebuilt, "active", active)
    return rebuilt


jax.tree_util.register_pytree_node(AdapterSet, _flatten, _unflatten)
