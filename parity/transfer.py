"""Moving LoRA tensors between the halves, name to name.

Both halves name an adapted module by the same dotted string (docs/architecture.md):
the Flax path ``("transformer", "h", "0", "attn", "c_attn")`` joined by dots is the torch
module name ``transformer.h.0.attn.c_attn``. Both store ``A`` as (in, r) and ``B`` as
(r, out), so tensors cross without a transpose. The neutral form in between is
``{dotted name: (A, B)}`` of float32 numpy arrays; on the JAX side the arrays travel with their
``LoraConfig`` as one ``lora_jax.Adapter``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NamedLora = dict[str, tuple[np.ndarray, np.ndarray]]


def adapter_to_named(adapter: Any) -> NamedLora:
    """A ``lora_jax.Adapter`` (or its gradients, also an ``Adapter``) as ``{dotted name: (A, B)}`` (float32 numpy).

    Raises:
        TypeError: ``adapter`` is not an ``Adapter`` (a bare LoRA tree carries no config).
    """
    from lora_jax.adapter import checked_modules

    return {".".join(path): (np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
            for path, (a, b) in checked_modules(adapter).items()}


def named_to_adapter(named: Mapping[str, tuple[Any, Any]], config: Any, device: Any = None) -> Any:
    """``{dotted name: (A, B)}`` as a ``lora_jax.Adapter`` carrying ``config``, on ``device``.

    Raises:
        ValueError: A module's shapes disagree with ``config.rank``.
    """
    import jax
    import jax.numpy as jnp
    from lora_jax import Adapter
    from lora_jax.adapter import checked_modules
    from lora_jax.lora_tree import nest

    tree = nest({tuple(name.split(".")): {"lora_A": jnp.asarray(a, jnp.float32), "lora_B": jnp.asarray(b, jnp.float32)}
                 for name, (a, b) in named.items()})
    adapter = Adapter(tree, config)
    checked_modules(adapter)  # the weights and the config must belong together
    return adapter if device is None else jax.device_put(adapter, device)


def jax_kernel(params: Mapping[str, Any], name: str) -> Any:
    """The ``kernel`` leaf (in, out) of the module called ``name`` in a params tree.

    >>> jax_kernel({"h": {"0": {"c_attn": {"kernel": np.zeros((4, 12))}}}}, "h.0.c_attn").shape
    (4, 12)
    """
    node = params
    for key in name.split("."):
        node = node[key]
    return node["kernel"]


def torch_lora_to_named(model: Any) -> NamedLora:
    """Every ``lora_torch`` wrapper's ``(A, B)`` by module name (float32 numpy)."""
    from lora_torch import lora_wrappers

    return {name: (_numpy(w.lora.lora_A), _numpy(w.lora.lora_B)) for name, w in lora_wrappers(model).items()}


def torch_lora_grads(model: Any) -> dict[str, np.ndarray]:
    """``{"<module>.lora_A": grad, "<module>.lora_B": grad}`` after a backward pass (zeros when unset)."""
    from lora_torch import lora_wrappers

    grads = {}
    for name, wrapper in lora_wrappers(model).items():
        for leaf in ("lora_A", "lora_B"):
            param = getattr(wrapper.lora, leaf)
            grads[f"{name}.{leaf}"] = np.zeros(tuple(param.shape), np.float32) if param.grad is None \
                else _numpy(param.grad)
    return grads


def flat_leaves(named: Mapping[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """``{dotted name: (A, B)}`` as ``{"<name>.lora_A": A, "<name>.lora_B": B}``.

    >>> sorted(flat_leaves({"h.0.c_attn": (np.zeros((4, 2)), np.ones((2, 4)))}))
    ['h.0.c_attn.lora_A', 'h.0.c_attn.lora_B']
    """
    flat = {}
    for name, (a, b) in named.items():
        flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = np.asarray(a), np.asarray(b)
    return flat


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def copy_into_torch(model: Any, named: Mapping[str, tuple[Any, Any]]) -> None:
    """Copies ``{dotted name: (A, B)}`` into the model's LoRA wrappers, all or nothing.

    Raises:
        ValueError: The module names or shapes differ; nothing is copied then. The message
            names every module only on one side, so a skipped layer is obvious.
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
    with torch.no_grad():
        for name, (a, b) in named.items():
            lora = wrappers[name].lora
            lora.lora_A.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))  # a writable copy
            lora.lora_B.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
