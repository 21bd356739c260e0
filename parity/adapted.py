"""Both halves with the same LoRA adapter: injected once per half, values copied, never re-initialised.

``A`` comes from ``lora_jax``'s own initialiser (the bound both halves share), ``B`` is
drawn non-zero here: with ``B = 0`` the LoRA branch is zero, so every forward, merge and
interchange comparison would pass whatever the code did. The same arrays then go into
the torch wrappers by name. On the JAX side they stay one ``lora_jax.Adapter``: the arrays
with the ``LoraConfig`` that gives their scale, so no check can pair them with another alpha.

DoRA's magnitude ``m`` is perturbed for the same reason: ``init_lora`` sets it to the column norm
``||W0||``, and with ``m`` equal to ``||W0 + s A B||`` the rescaling is the identity and DoRA computes
plain LoRA, so a half that ignored ``m`` would pass.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.pair import ModelPair
from parity.results import CheckResult, compare_exact
from parity.transfer import (
    adapter_embeddings,
    adapter_magnitudes,
    adapter_to_named,
    copy_into_torch,
    jax_kernel,
    named_to_adapter,
)

# Target size of the LoRA branch's output (std), relative to unit-scale activations: large enough
# that the delta dominates rounding noise, small enough to stay in the model's working range.
BRANCH_SCALE = 0.1
# DoRA: m is drawn as m0 * (1 + MAGNITUDE_SPREAD * N(0, 1)), so m / ||W0 + sAB|| moves ~10% off 1 per feature.
MAGNITUDE_SPREAD = 0.1
# A module whose max |m / ||W0 + sAB|| - 1| is at most this (float32 rounding of the norm) computes plain LoRA.
INERT_MAGNITUDE = 1e-6


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

    @functools.cached_property
    def peft_model(self) -> Any:
        """The reference: ``peft.get_peft_model`` on a base copy, holding the adapter's values (eval mode).

        With a 4-bit pair its base is transformers' own 4-bit model (``ModelPair.reference_copy``). Built on
        first use and kept; treat it as read-only (copy it to train or merge). Raises when PEFT
        builds other modules or ranks than the adapter has (:func:`parity.peft_reference.set_peft_weights`).
        """
        from parity.peft_reference import peft_adapted

        return peft_adapted(self.pair.reference_copy(), self.adapter)


def random_nonzero_b(adapter: Any, seed: int, params: Any = None) -> Any:
    """The adapter with every ``B`` replaced by seeded normal values (``A`` and the config kept).

    The std is ``BRANCH_SCALE / (scaling * sqrt(rank))`` so the branch output has about the
    same size whatever rank, alpha and rsLoRA are. A DoRA adapter's magnitudes become
    ``||W0 + s A B||_c * (1 + MAGNITUDE_SPREAD * N(0, 1))`` with the new ``B`` (drawn after every ``B``),
    so DoRA rescales each output feature by about 10%, whatever the base weights are.

    Raises:
        ValueError: A DoRA adapter without ``params`` (the base weights its norms are taken of).
    """
    rng = np.random.default_rng(seed)
    named = {}
    for path, (a, b) in adapter.modules().items():
        std = BRANCH_SCALE / (adapter.scaling(path) * np.sqrt(adapter.rank(path)))
        named[".".join(path)] = (a, rng.normal(0.0, std, size=b.shape).astype(np.float32))
    embeddings = adapter_embeddings(adapter)
    for name in embeddings:  # drawn after every B, so the projections' values do not move when wte is added
        # An embedding's A starts at 0 (PEFT's init): A ~ N(0, 1) makes the row A[id] @ B the size B's std aims at.
        named[name] = (rng.normal(0.0, 1.0, size=np.shape(named[name][0])).astype(np.float32), named[name][1])
    drawn = named_to_adapter(named, adapter.config, magnitudes=adapter_magnitudes(adapter), embeddings=embeddings)
    if not adapter.config.use_dora:
        return drawn
    if params is None:
        raise ValueError("random_nonzero_b needs the base params of a DoRA adapter: its magnitudes are drawn "
                         "around the column norms of W0 + s A B.")
    magnitudes = {name: (norm * (1.0 + MAGNITUDE_SPREAD * rng.normal(size=norm.shape))).astype(np.float32)
                  for name, norm in dora_norms(params, drawn).items()}
    return named_to_adapter(named, adapter.config, magnitudes=magnitudes, embeddings=embeddings)


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
        params = pair.jax_float_params()  # a QLoRA base: init and DoRA's norms see the dequantized kernels
        adapter = random_nonzero_b(pair.impl.jax_init_lora(params, config, jax.random.key(seed)), seed + 1,
                                   params=params)
    adapter = jax.device_put(adapter, pair.placement.jax_device)
    copy_into_torch(torch_model, adapter_to_named(adapter), adapter_magnitudes(adapter))
    return AdaptedPair(pair=pair, adapter=adapter, torch_model=torch_model)


def nonzero_b_row(stage: str, adapter: Any) -> CheckResult:
    """Fails when any module's ``B`` is all zeros (the comparison would then prove nothing).

    An embedding's ``A`` starts at zero instead (PEFT's init), so an embedding with ``A == 0`` counts too.
    The row's error is the number of such modules.
    """
    named = adapter_to_named(adapter)
    embeddings = adapter_embeddings(adapter)
    zero = sorted(name for name, (a, b) in named.items() if not np.any(b) or (name in embeddings and not np.any(a)))
    row = compare_exact(stage, "LoRA B non-zero (modules with B == 0)", len(zero), 0)
    if zero:
        detail = f"B == 0 in {len(zero)}/{len(named)} modules (e.g. {zero[0]}): the LoRA branch is zero, so " \
                 "this stage would pass whatever the code did; train the adapter or draw a non-zero B"
    else:
        detail = f"{len(named)} modules, all B != 0" + (f" (and A != 0 in {', '.join(embeddings)})" if embeddings else "")
    return dataclasses.replace(row, detail=detail)


def dora_norms(params: Any, adapter: Any) -> dict[str, np.ndarray]:
    """``{name: ||W0 + s A B||_c}`` (out,) per DoRA module, in float64 numpy (independent of both halves).

    The norm is per output feature: over axis 0 of the (in, out) kernel, as DoRA and PEFT take it.

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> from parity.transfer import named_to_adapter
    >>> config = LoraConfig(rank=1, alpha=1.0, target_modules=["m"], use_dora=True)
    >>> adapter = named_to_adapter({"m": (np.zeros((2, 1)), np.zeros((1, 2)))}, config,
    ...                            magnitudes={"m": np.array([10.0, 1.0])})
    >>> dora_norms({"m": {"kernel": np.array([[3.0, 0.0], [4.0, 1.0]])}}, adapter)["m"].tolist()
    [5.0, 1.0]
    """
    named = adapter_to_named(adapter)
    norms = {}
    for name in adapter_magnitudes(adapter):
        a, b = (np.asarray(x, np.float64) for x in named[name])
        v = np.asarray(jax_kernel(params, name), np.float64) + adapter.scaling(tuple(name.split("."))) * (a @ b)
        norms[name] = np.linalg.norm(v, axis=0)
    return norms


def dora_factors(params: Any, adapter: Any) -> dict[str, np.ndarray]:
    """``{name: m / ||W0 + s A B||_c}`` (out,) per DoRA module: how much DoRA rescales each output feature."""
    magnitudes = adapter_magnitudes(adapter)
    return {name: np.asarray(magnitudes[name], np.float64) / norm for name, norm in dora_norms(params, adapter).items()}


def dora_magnitude_row(stage: str, params: Any, adapter: Any) -> CheckResult:
    """Fails when a DoRA module's ``m`` equals ``||W0 + s A B||_c`` (its rescaling is then the identity).

    With ``m / ||V||_c = 1`` DoRA computes plain LoRA, so a half that ignored ``m`` would pass every
    comparison. The row's error is the number of such modules.
    """
    factors = dora_factors(params, adapter)
    inert = sorted(name for name, f in factors.items() if np.max(np.abs(f - 1.0)) <= INERT_MAGNITUDE)
    row = compare_exact(stage, "DoRA m != ||W0 + sAB|| (modules where they are equal)", len(inert), 0)
    if inert:
        detail = f"m == ||W0 + sAB|| in {len(inert)}/{len(factors)} modules (e.g. {inert[0]}): DoRA is plain LoRA " \
                 "there, so a half that ignored m would pass; train the adapter or perturb m"
    else:
        spread = max(float(np.max(np.abs(f - 1.0))) for f in factors.values())
        detail = f"{len(factors)} modules, max |m / ||W0 + sAB|| - 1| = {spread:.3g}"
    return dataclasses.replace(row, detail=detail)


def guard_rows(stage: str, adapted: AdaptedPair) -> list[CheckResult]:
    """The rows that make a stage's comparison meaningful: ``B != 0``, and for DoRA ``m != ||W0 + sAB||``."""
    rows = [nonzero_b_row(stage, adapted.adapter)]
    if adapted.config.use_dora:
        rows.append(dora_magnitude_row(stage, adapted.pair.jax_float_params(), adapted.adapter))
    return rows
