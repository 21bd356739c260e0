"""Both halves with the same LoRA adapter: injected once per half, values copied, never re-initialised.

``A`` comes from ``lora_jax``'s own initialiser (the bound both halves share), ``B`` is
drawn non-zero here: with ``B = 0`` the LoRA branch is zero, so every forward, merge and
interchange comparison would pass whatever the code did. The same arrays then go into
the torch wrappers by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.pair import ModelPair
from parity.results import CheckResult, compare_exact
from parity.transfer import copy_into_torch, jax_lora_to_named, named_to_jax_lora

# Target size of the LoRA branch's output (std), relative to unit-scale activations: large enough
# that the delta dominates rounding noise, small enough to stay in the model's working range.
BRANCH_SCALE = 0.1


@dataclass(frozen=True)
class AdaptedPair:
    """A :class:`ModelPair` plus one adapter present in both halves.

    Attributes:
        pair: The base pair.
        config: The ``lora_jax.LoraConfig`` both halves were adapted with.
        lora: The JAX LoRA tree (on the pair's device).
        torch_model: A torch copy of the base with LoRA injected and these values copied in.
    """

    pair: ModelPair
    config: Any
    lora: Any
    torch_model: Any


def random_nonzero_b(lora: Any, config: Any, seed: int) -> Any:
    """The LoRA tree with every ``B`` replaced by seeded normal values (``A`` kept).

    The std is ``BRANCH_SCALE / (scaling * sqrt(rank))`` so the branch output has about the
    same size whatever rank, alpha and rsLoRA are.
    """
    rng = np.random.default_rng(seed)
    std = BRANCH_SCALE / (config.scaling * np.sqrt(config.rank))
    named = {name: (a, rng.normal(0.0, std, size=b.shape).astype(np.float32))
             for name, (a, b) in jax_lora_to_named(lora).items()}
    return named_to_jax_lora(named)


def adapt(pair: ModelPair, config: Any, *, seed: int = 0, lora: Any = None) -> AdaptedPair:
    """Injects LoRA into a torch copy and builds the JAX tree, with one set of values for both.

    Args:
        pair: The base pair.
        config: A ``lora_jax.LoraConfig``.
        seed: Seeds ``A`` (via ``jax_init_lora``) and the non-zero ``B``.
        lora: Use this LoRA tree (e.g. a loaded adapter) instead of drawing one.

    Raises:
        ValueError: The halves targeted different modules or shapes (see ``copy_into_torch``).
    """
    import jax

    torch_model = pair.impl.torch_inject(pair.torch_copy(), config)
    if lora is None:
        lora = pair.impl.jax_init_lora(pair.jax_params, config, jax.random.key(seed))
        lora = random_nonzero_b(lora, config, seed + 1)
    lora = jax.device_put(lora, pair.placement.jax_device)
    copy_into_torch(torch_model, jax_lora_to_named(lora))
    return AdaptedPair(pair=pair, config=config, lora=lora, torch_model=torch_model)


def nonzero_b_row(stage: str, lora: Any) -> CheckResult:
    """Fails when any module's ``B`` is all zeros (the comparison would then prove nothing).

    The row's error is the number of modules whose ``B`` is zero.
    """
    named = jax_lora_to_named(lora)
    zero = sorted(name for name, (_, b) in named.items() if not np.any(b))
    row = compare_exact(stage, "LoRA B non-zero (modules with B == 0)", len(zero), 0)
    if zero:
        detail = f"B == 0 in {len(zero)}/{len(named)} modules (e.g. {zero[0]}): the LoRA branch is zero, so " \
                 "this stage would pass whatever the code did; train the adapter or draw a non-zero B"
    else:
        detail = f"{len(named)} modules, all B != 0"
    return dataclasses.replace(row, detail=detail)
