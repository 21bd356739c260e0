"""Moving LoRA tensors between the halves, name to name.

Both halves name an adapted module by the same dotted string (docs/architecture.md):
the Flax path ``("transformer", "h", "0", "attn", "c_attn")`` joined by dots is the torch
module name ``transformer.h.0.attn.c_attn``. Both store ``A`` as (in, r) and ``B`` as
(r, out), so tensors cross without a transpose. The neutral form in between is
``{dotted name: (A, B)}`` of float32 numpy arrays, plus ``{dotted name: m}`` for DoRA's magnitude
(out,), which needs no transpose either; on the JAX side the arrays travel with their ``LoraConfig``
as one ``lora_jax.Adapter``. Compared tensor by tensor, they are flattened to
``{"<name>.lora_A": A, "<name>.lora_B": B, "<name>.lora_magnitude_vector": m}`` (:func:`flat_leaves`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

NamedLora = dict[str, tuple[np.ndarray, np.ndarray]]
# An embedding's leaves in a lora_jax tree (PEFT's names; ``lora_jax.lora_tree``).
EMBEDDING_A, EMBEDDING_B = "lora_embedding_A", "lora_embedding_B"
# The flat key of DoRA's magnitude: PEFT's name for it (``lora_format.peft_keys.LORA_MAGNITUDE``).
MAGNITUDE = "lora_magnitude_vector"


def adapter_to_named(adapter: Any) -> NamedLora:
    """A ``lora_jax.Adapter`` (or its gradients, also an ``Adapter``) as ``{dotted name: (A, B)}`` (float32 numpy).

    Raises:
        TypeError: ``adapter`` is not an ``Adapter`` (a bare LoRA tree carries no config).
    """
    from lora_jax.adapter import checked_modules

    return {".".join(path): (np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
            for path, (a, b) in checked_modules(adapter).items()}


def adapter_magnitudes(adapter: Any) -> dict[str, np.ndarray]:
    """DoRA's magnitudes ``{dotted name: m}`` (out,) of a ``lora_jax.Adapter`` (or its gradients); empty for LoRA."""
    return {".".join(path): np.asarray(m, dtype=np.float32) for path, m in adapter.magnitudes().items()}


def named_to_adapter(named: Mapping[str, tuple[Any, Any]], config: Any, device: Any = None,
                     magnitudes: Mapping[str, Any] | None = None, embeddings: Collection[str] = ()) -> Any:
    """``{dotted name: (A, B)}`` (and DoRA's ``{dotted name: m}``) as a ``lora_jax.Adapter`` carrying ``config``.

    The modules named in ``embeddings`` (e.g. ``adapter_embeddings(adapter)``) hold an embedding's LoRA, stored
    as ``lora_embedding_A``/``_B`` (the same (in, r), (r, out) layout under PEFT's embedding names).

    Raises:
        ValueError: A module's shapes disagree with ``config.rank``, or magnitudes are missing for a
            ``use_dora`` config (or given without it).
    """
    import jax
    import jax.numpy as jnp
    from lora_jax import Adapter
    from lora_jax.adapter import checked_modules
    from lora_jax.lora_tree import nest

    magnitudes = magnitudes or {}
    entries = {}
    for name, (a, b) in named.items():
        a_key, b_key = (EMBEDDING_A, EMBEDDING_B) if name in embeddings else ("lora_A", "lora_B")
        entries[tuple(name.split("."))] = {a_key: jnp.asarray(a, jnp.float32), b_key: jnp.asarray(b, jnp.float32)}
        if name in magnitudes:
            entries[tuple(name.split("."))][MAGNITUDE] = jnp.asarray(magnitudes[name], jnp.float32)
    tree = nest(entries)
    adapter = Adapter(tree, config)
    checked_modules(adapter)  # the weights and the config must belong together
    return adapter if device is None else jax.device_put(adapter, device)


def adapter_embeddings(adapter: Any) -> tuple[str, ...]:
    """The dotted names of an adapter's embedding modules (``lora_embedding_A``/``_B``), e.g. ``transformer.wte``."""
    return tuple(".".join(path) for path in adapter.embeddings())


def jax_kernel(params: Mapping[str, Any], name: str) -> Any:
    """The ``kernel`` leaf (in, out) of the module called ``name`` in a params tree; an ``nn.Embed``'s
    ``embedding`` table (num_embeddings, features), the (in, out) of its LoRA update, for an embedding.

    >>> jax_kernel({"h": {"0": {"c_attn": {"kernel": np.zeros((4, 12))}}}}, "h.0.c_attn").shape
    (4, 12)
    >>> jax_kernel({"wte": {"embedding": np.zeros((50, 4))}}, "wte").shape
    (50, 4)
    """
    node = params
    for key in name.split("."):
        node = node[key]
    return node["kernel"] if "kernel" in node else node["embedding"]


def torch_lora_to_named(model: Any) -> NamedLora:
    """Every ``lora_torch`` wrapper's ``(A, B)`` by module name (float32 numpy)."""
    from lora_torch import lora_wrappers

    return {name: (_numpy(w.lora.lora_A), _numpy(w.lora.lora_B)) for name, w in lora_wrappers(model).items()}


def _torch_parameters(model: Any) -> dict[str, Any]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B, "<module>.lora_magnitude_vector": m}`` (live torch parameters)."""
    from lora_torch import lora_wrappers

    params = {}
    for name, wrapper in lora_wrappers(model).items():
        params[f"{name}.lora_A"], params[f"{name}.lora_B"] = wrapper.lora.lora_A, wrapper.lora.lora_B
        if getattr(wrapper.lora, "use_dora", False):
            params[f"{name}.{MAGNITUDE}"] = wrapper.lora.magnitude
    return params


def torch_lora_leaves(model: Any) -> dict[str, np.ndarray]:
    """Every ``lora_torch`` wrapper's A, B (and DoRA's m) as flat float32 numpy leaves (see :func:`flat_leaves`)."""
    return {key: _numpy(param) for key, param in _torch_parameters(model).items()}


def torch_lora_grads(model: Any) -> dict[str, np.ndarray]:
    """The gradients of :func:`torch_lora_leaves`' leaves after a backward pass (zeros when unset)."""
    return {key: np.zeros(tuple(param.shape), np.float32) if param.grad is None else _numpy(param.grad)
            for key, param in _torch_parameters(model).items()}


def flat_leaves(named: Mapping[str, tuple[Any, Any]], magnitudes: Mapping[str, Any] | None = None
                ) -> dict[str, np.ndarray]:
    """``{dotted name: (A, B)}`` (and ``{dotted name: m}``) as ``{"<name>.lora_A": A, "<name>.lora_B": B, ...}``.

    >>> sorted(flat_leaves({"h.0.c_attn": (np.zeros((4, 2)), np.ones((2, 4)))}, {"h.0.c_attn": np.ones(4)}))
    ['h.0.c_attn.lora_A', 'h.0.c_attn.lora_B', 'h.0.c_attn.lora_magnitude_vector']
    """
    flat = {}
    for name, (a, b) in named.items():
        flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = np.asarray(a), np.asarray(b)
    for name, m in (magnitudes or {}).items():
        flat[f"{name}.{MAGNITUDE}"] = np.asarray(m)
    return flat


def adapter_leaves(adapter: Any) -> dict[str, np.ndarray]:
    """A ``lora_jax.Adapter``'s (or its gradients') A, B and DoRA m as flat float32 leaves (:func:`flat_leaves`)."""
    return flat_leaves(adapter_to_named(adapter), adapter_magnitudes(adapter))


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def copy_into_torch(model: Any, named: Mapping[str, tuple[Any, Any]],
                    magnitudes: Mapping[str, Any] | None = None) -> None:
    """Copies ``{dotted name: (A, B)}`` (and DoRA's ``{name: m}``) into the model's LoRA wrappers, all or nothing.

    Raises:
        ValueError: The module names or shapes differ, or DoRA is on in one half only; nothing is
            copied then. The message names every module only on one side, so a skipped layer is obvious.
    """
    import torch
    from lora_torch import lora_wrappers

    wrappers = lora_wrappers(model)
    only_torch, only_given = sorted(set(wrappers) - set(named)), sorted(set(named) - set(wrappers))
    if only_torch or only_given:
        raise ValueError(f"LoRA modules differ between the halves: only in torch {only_torch}, only in the "
                         f"copied tensors {only_given}. Both halves must target the same modules.")
    for name, (a, b) in named.items():
        lora = wrappers[name].lora
        want = (tuple(lora.lora_A.shape), tuple(lora.lora_B.shape))
        if (tuple(np.shape(a)), tuple(np.shape(b))) != want:
            raise ValueError(f"{name}: A, B shapes {np.shape(a)}, {np.shape(b)} do not fit torch's {want} "
                             "(A is (in, r), B is (r, out) in both halves).")
    magnitudes = magnitudes or {}
    dora = sorted(name for name, wrapper in wrappers.items() if getattr(wrapper.lora, "use_dora", False))
    if dora != sorted(magnitudes):
        raise ValueError(f"DoRA differs between the halves: torch has DoRA wrappers on {dora[:3]} ({len(dora)} "
                         f"modules), the copied tensors hold magnitudes for {sorted(magnitudes)[:3]} "
                         f"({len(magnitudes)}). Both halves must be injected with the same use_dora.")
    for name, m in magnitudes.items():
        if tuple(np.shape(m)) != tuple(wrappers[name].lora.magnitude.shape):
            raise ValueError(f"{name}: DoRA magnitude shape {np.shape(m)} does not fit torch's "
                             f"{tuple(wrappers[name].lora.magnitude.shape)} (one entry per output feature).")
    with torch.no_grad():
        for name, (a, b) in named.items():
            lora = wrappers[name].lora
            lora.lora_A.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))  # a writable copy
            lora.lora_B.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
        for name, m in magnitudes.items():
            wrappers[name].lora.magnitude.copy_(torch.from_numpy(np.array(m, dtype=np.float32)))
