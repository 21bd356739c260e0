"""Both halves with the same LoRA adapter: injected once per half, values copied, never re-initialised.

``A`` comes from ``lora_jax``'s own initialiser (the bound both halves share), ``B`` is
drawn non-zero here: with ``B = 0`` the LoRA branch is zero, so every forward, merge and
interchange comparison would pass whatever the code did. The same arrays then go into
the torch wrappers by name. On the JAX side they stay one ``lora_jax.Adapter``: the arrays
with the ``LoraConfig`` that gives their scale, so no check can pair them with another alpha.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.pair import ModelPair
from parity.results import CheckResult, compare_exact
from parity.transfer import adapter_to_named, copy_into_torch, named_to_adapter

# Target size of the LoRA branch's output (std), relative to unit-scale activations: large enough
# that the delta dominates rounding noise, small enough to stay in the model's working range.
BRANCH_SCALE = 0.1


@dataclass(frozen=True)
class AdaptedPair:
    """A :class:`ModelPair` plus one adapter present in both halves.

    Attributes:
        pair: The base pair.
        adapter: The ``lora_jax.Adapter`` (arrays and their ``LoraConfig``) on the pair's device.
        torch_model: A torch copy of the base with LoRA injected by the adapter's config and its values copied in.
    """

    pair: ModelPair
    adapter: Any
    torch_model: Any

    @property
    def config(self) -> Any:
        """The ``lora_jax.LoraConfig`` both halves were adapted with (the adapter's own)."""
        return self.adapter.config


def random_nonzero_b(adapter: Any, seed: int) -> Any:
    """The adapter with every ``B`` replaced by seeded normal values (``A`` and the config kept).

    The std is ``BRANCH_SCALE / (scaling * sqrt(rank))`` so the branch output has about the
    same size whatever rank, alpha and rsLoRA are.
    """
    rng = np.random.default_rng(seed)
    named = {}
    for path, (a, b) in adapter.modules().items():
        std = BRANCH_SCALE / (adapter.scaling(path) * np.sqrt(adapter.rank(path)))
        named[".".join(path)] = (a, rng.normal(0.0, std, size=b.shape).astype(np.float32))
    return named_to_adapter(named, adapter.config)


def adapt(pair: ModelPair, source: Any, *, seed: int = 0) -> AdaptedPair:
    """Injects LoRA into a torch copy and puts one adapter's values into both halves.

    Args:
        pair: The base pair.
        source: A ``lora_jax.LoraConfig``, to draw a new adapter (``A`` from ``jax_init_lora``,
            ``B`` non-zero); or a ``lora_jax.Adapter`` to use as it is (e.g. a loaded one), whose
            config then drives the torch injection too.
        seed: Seeds ``A`` and the non-zero ``B`` (unused for an ``Adapter``).

    Raises:
        TypeError: ``source`` is neither a ``LoraConfig`` nor an ``Adapter``.
        ValueError: The halves targeted different modules or shapes (see ``copy_into_torch``).
    """
    import jax
    from lora_jax import Adapter, LoraConfig

    if not isinstance(source, (LoraConfig, Adapter)):
        raise TypeError(f"adapt takes a lora_jax.LoraConfig or a lora_jax.Adapter, got {type(source).__name__}.")
    config = source if isinstance(source, LoraConfig) else source.config
    torch_model = pair.impl.torch_inject(pair.torch_copy(), config)
    if isinstance(source, Adapter):
        adapter = source
    else:
        adapter = random_nonzero_b(pair.impl.jax_init_lora(pair.jax_params, config, jax.random.key(seed)), seed + 1)
    adapter = jax.device_put(adapter, pair.placement.jax_device)
    copy_into_torch(torch_model, adapter_to_named(adapter))
    return AdaptedPair(pair=pair, adapter=adapter, torch_model=torch_model)


def nonzero_b_row(stage: str, adapter: Any) -> CheckResult:
    """Fails when any module's ``B`` is all zeros (the comparison would then prove nothing).

    The row's error is the number of modules whose ``B`` is zero.
    """
    named = adapter_to_named(adapter)
    zero = sorted(name for name, (_, b) in named.items() if not np.any(b))
    row = compare_exact(stage, "LoRA B non-zero (modules with B == 0)", len(zero), 0)
    if zero:
        detail = f"B == 0 in {len(zero)}/{len(named)} modules (e.g. {zero[0]}): the LoRA branch is zero, so " \
                 "this stage would pass whatever the code did; train the adapter or draw a non-zero B"
    else:
        detail = f"{len(named)} modules, all B != 0"
    return dataclasses.replace(row, detail=detail)
