"""The LoRA forward pass, added to any Flax model by intercepting ``nn.Dense`` calls.

Inside ``lora_interception`` each ``flax.linen.Dense`` whose module path is in the LoRA tree
returns ``x W0 + b + s * (dropout(x) A) B`` (a DoRA module adds ``lora_jax.dora.dora_extra``), and
each adapted ``flax.linen.Embed`` returns ``E[ids] + s * A[ids] B`` from its ``__call__``. An Embed's
``attend`` (the tied output head of GPT-2) is left alone: PEFT adapts the input lookup only. The model's code is untouched, its params stay
frozen arguments, and the branch is the factorised product: ``W0 + s A B`` is never formed,
which keeps a training step near 4N FLOPs per token instead of full fine-tuning's 6N.

The branch is computed in the dtype the Dense layer computed in (bf16 when the model runs
in bf16), with float32 ``A`` and ``B`` cast to it, and uses the layer's ``precision``.
Dropout needs ``dropout_rng``; without it the branch is deterministic (evaluation). Each
module folds its own dotted name into the key, so masks differ across modules.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax.adapter import Adapter
    >>> from lora_jax.config import LoraConfig
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3, name="out")(x)
    >>> model, x = Net(), jnp.ones((1, 2))
    >>> params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    >>> config = LoraConfig(rank=1, alpha=0.5, target_modules=["out"])
    >>> adapter = Adapter({"out": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 3))}}, config)
    >>> forward = jax.jit(lora_apply(model.apply))
    >>> (forward(params, adapter, x) - jax.jit(model.apply)({"params": params}, x)).round(4).tolist()
    [[1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter, checked_modules
from lora_jax.adapter_set import AdapterSet
from lora_jax.delta import lora_product
from lora_jax.dora import dora_extra
from lora_jax.mixed_batch import mixed_dense_branch, mixed_dropout, mixed_embedding_branch, stacked_factors
from lora_jax.nf4 import NF4Tensor
from lora_jax.qlora import has_nf4, nf4_dense
from lora_jax.lora_tree import ModulePath
from lora_jax.targets import dotted_name


def module_rng(rng: jax.Array, path: ModulePath) -> jax.Array:
    """A per-module key: ``rng`` with a stable hash of the dotted name folded in.

    crc32 rather than ``hash``: Python salts string hashes per process, which would make
    dropout masks differ between runs with the same key.
    """
    return jax.random.fold_in(rng, zlib.crc32(dotted_name(path).encode()) & 0x7FFFFFFF)


def dropout_input(x: jax.Array, dropout: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of the branch input: ``x`` itself when ``dropout`` is 0 or ``rng`` is None.

    >>> dropout_input(jnp.ones(3), 0.5, None).tolist()
    [1.0, 1.0, 1.0]
    """
    if dropout <= 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    return jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))


def lora_branch(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scaling: float,
    *,
    dtype: Any,
    precision: Any = None,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``s * (dropout(x) A) B`` in ``dtype``; ``x`` is (..., in), the result (..., out).

    >>> lora_branch(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 3)), 0.5, dtype=jnp.float32).tolist()
    [[1.0, 1.0, 1.0]]
    """
    return lora_product(dropout_input(x.astype(dtype), dropout, rng), a, b, scaling, dtype=dtype, precision=precision)


def embedding_branch(ids: jax.Array, a: jax.Array, b: jax.Array, scaling: float, *, dtype: Any) -> jax.Array:
    """``s * A[ids] B`` in ``dtype``: an embedding's LoRA output for integer ``ids`` (...,), shape (..., features).

    >>> embedding_branch(jnp.array([1]), jnp.array([[0.0], [2.0]]), jnp.ones((1, 3)), 0.5, dtype=jnp.float32).tolist()
    [[1.0, 1.0, 1.0]]
    """
    rows = jnp.take(a.astype(dtype), ids, axis=0)  # (..., r)
    return jnp.matmul(rows, b.astype(dtype)) * jnp.asarray(scaling, dtype)


# (the intercepted module, its input, its base output) -> what the adapter(s) add to that output
Extra = Callable[[nn.Module, jax.Array, jax.Array], jax.Array]


def _adapter_extras(adapter: Adapter, dropout_rng: jax.Array | None) -> dict[ModulePath, Extra]:
    """What one adapter adds at each of its modules."""
    entries = checked_modules(adapter)
    magnitudes = adapter.magnitudes()
    embeddings = set(adapter.embeddings())
    dropout = adapter.config.dropout

    def extra_at(path: ModulePath) -> Extra:
        a, b = entries[path]
        scaling = adapter.scaling(path)
        rng = None if dropout_rng is None else module_rng(dropout_rng, path)
        if path in embeddings:  # PEFT applies no dropout to an embedding's LoRA
            return lambda module, x, y: embedding_branch(x, a, b, scaling, dtype=y.dtype)
        if path in magnitudes:
            return lambda module, x, y: _dora_extra(module, y, x, a, b, magnitudes[path], scaling, dropout, rng)
        return lambda module, x, y: lora_branch(x, a, b, scaling, dtype=y.dtype, precision=module.precision,
                                                dropout=dropout, rng=rng)

    return {path: extra_at(path) for path in entries}


def _summed_extras(adapters: AdapterSet, dropout_rng: jax.Array | None) -> dict[ModulePath, Extra]:
    """The active adapters' extras, summed where several adapt one module (PEFT's several active adapters)."""
    active = [adapters.adapters[name] for name in adapters.active]
    if len(active) == 1:
        return _adapter_extras(active[0], dropout_rng)
    dora = [name for name in adapters.active if adapters.adapters[name].config.use_dora]
    if dora:
        raise ValueError(f"DoRA adapters {dora} cannot be active together with others: PEFT chains their outputs in "
                         "order, which makes the result depend on it. Activate one DoRA adapter at a time.")
    per_adapter = [_adapter_extras(adapter, dropout_rng) for adapter in active]
    paths = dict.fromkeys(path for extras in per_adapter for path in extras)

    def summed(path: ModulePath) -> Extra:
        parts = [extras[path] for extras in per_adapter if path in extras]
        return lambda module, x, y: sum(part(module, x, y) for part in parts)

    return {path: summed(path) for path in paths}


def _mixed_extras(adapters: AdapterSet, ids: jax.Array, dropout_rng: jax.Array | None) -> dict[ModulePath, Extra]:
    """Example ``i`` gets adapter ``ids[i]``'s branch, ``len(adapters.names)`` none (``lora_jax.mixed_batch``)."""
    members = list(adapters.adapters.values())
    dora = [name for name, adapter in adapters.adapters.items() if adapter.config.use_dora]
    if dora:
        raise ValueError(f"DoRA adapters {dora} cannot serve a mixed batch (PEFT refuses it too); run them one at "
                         "a time with AdapterSet.with_active.")
    for adapter in members:
        checked_modules(adapter)
    embeddings = {path for adapter in members for path in adapter.embeddings()}
    paths = dict.fromkeys(path for adapter in members for path in adapter.modules())

    def extra_at(path: ModulePath) -> Extra:
        a, b, scaling, rates = stacked_factors(members, path)
        if path in embeddings:
            return lambda module, x, y: mixed_embedding_branch(x, ids, a, b, scaling, dtype=y.dtype)
        rng = None if dropout_rng is None else module_rng(dropout_rng, path)
        return lambda module, x, y: mixed_dense_branch(mixed_dropout(x.astype(y.dtype), ids, rates, rng), ids, a, b,
                                                       scaling, dtype=y.dtype, precision=module.precision)

    return {path: extra_at(path) for path in paths}


def _extras(adapter: Adapter | AdapterSet, dropout_rng: jax.Array | None, adapter_names: Any
            ) -> dict[ModulePath, Extra]:
    if isinstance(adapter, AdapterSet):
        if adapter_names is None:
            return _summed_extras(adapter, dropout_rng) if adapter.active else {}
        return _mixed_extras(adapter, _example_ids(adapter, adapter_names), dropout_rng)
    if adapter_names is not None:
        raise TypeError("adapter_names selects adapters of a lora_jax.AdapterSet; this is a single Adapter. Wrap "
                        "adapters in AdapterSet({name: adapter, ...}) for a mixed batch.")
    return _adapter_extras(adapter, dropout_rng)


def _example_ids(adapters: AdapterSet, adapter_names: Any) -> jax.Array:
    if isinstance(adapter_names, (str, list, tuple)):
        return adapters.example_ids(adapter_names)
    ids = jnp.asarray(adapter_names)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"adapter_names must be a list of names or a 1-D int array from AdapterSet.example_ids, got "
                        f"{ids.dtype} of shape {ids.shape}.")
    return ids


def _embedding_paths(adapter: Adapter | AdapterSet) -> set[ModulePath]:
    members = adapter.adapters.values() if isinstance(adapter, AdapterSet) else [adapter]
    return {path for member in members for path in member.embeddings()}


@contextlib.contextmanager
def lora_interception(
    adapter: Adapter | AdapterSet,
    *,
    dropout_rng: jax.Array | None = None,
    strict: bool = True,
    adapter_names: Any = None,
) -> Iterator[None]:
    """Within the block, adapted ``nn.Dense`` layers add their LoRA branch to their output.

    Use it around any ``model.apply`` (or bound-module call) whose params the adapter was
    built from. Enter it *inside* the function you jit: interception happens while tracing,
    and a function jitted and traced outside the context keeps its cached, LoRA-free trace.

    Args:
        adapter: The ``Adapter`` (from ``init_lora`` or ``load_adapter``); its config supplies
            each module's scaling and the dropout rate. Or an ``AdapterSet``: its active adapters'
            branches are summed, or, with ``adapter_names``, each example takes its own.
        dropout_rng: Key for dropout on the branch input; None disables dropout.
        strict: Raise if some LoRA module was never called as an ``nn.Dense``, which means the
            tree does not belong to this model (or the module is not a Dense layer).
        adapter_names: With an ``AdapterSet``: one adapter name per example (``"__base__"`` for none),
            or the int array ``AdapterSet.example_ids(names)`` gives (which a jitted caller can pass).

    Raises:
        TypeError: ``adapter`` is neither an ``Adapter`` nor an ``AdapterSet``, or ``adapter_names``
            is given with a single ``Adapter``.
        ValueError: The adapter's shapes disagree with its rank; an unknown name; DoRA adapters in a
            mixed batch or active together with others; or, with ``strict``, when the block ends
            and some LoRA module went unused.
    """
    with _intercepted(_extras(adapter, dropout_rng, adapter_names), _embedding_paths(adapter), strict):
        yield


def _nf4_kernel(module: nn.Module) -> NF4Tensor | None:
    if not isinstance(module, nn.Dense):
        return None
    kernel = module.variables.get("params", {}).get("kernel")
    return kernel if isinstance(kernel, NF4Tensor) else None


def _base_output(module: nn.Module, next_fun: Callable, args: tuple, kwargs: dict) -> jax.Array:
    """The module's own output. A Dense holding an NF4 kernel (a QLoRA base) computes it with ``nf4_dense``,
    which dequantizes the kernel here, where it is used, and again in the backward pass."""
    kernel = _nf4_kernel(module)
    if kernel is None:
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    bias = module.variables["params"].get("bias") if module.use_bias else None
    return nf4_dense(x, kernel, bias, dtype=module.dtype, precision=module.precision)


@contextlib.contextmanager
def _intercepted(extras: dict[ModulePath, Extra], embeddings: set[ModulePath], strict: bool) -> Iterator[None]:
    """Adds ``extras[path]`` to the output of each adapted Dense / Embed, and runs NF4 Dense kernels through
    ``nf4_dense``; with ``strict``, checks at the end that every adapted module was called."""
    applied: set[ModulePath] = set()

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Embed)):
            return next_fun(*args, **kwargs)  # an Embed's attend (GPT-2's tied head) is never adapted, as in PEFT
        path = tuple(module.path)
        y = _base_output(module, next_fun, args, kwargs)
        if path not in extras or isinstance(module, nn.Embed) != (path in embeddings):
            return y
        x = args[0] if args else kwargs["inputs"]
        applied.add(path)
        return y + extras[path](module, x, y)

    with nn.intercept_methods(interceptor):
        yield
    missing = [dotted_name(p) for p in extras if p not in applied]
    if strict and missing:
        raise ValueError(
            f"LoRA modules {missing[:8]} were never called as flax.linen.Dense (or, for lora_embedding_A/B, "
            "flax.linen.Embed) layers in this forward pass. The adapter must mirror the module paths of the model "
            "being applied (pass variables['params'] to init_lora), and only those layer types can be adapted."
        )


def _dora_extra(module: nn.Dense, y: jax.Array, x: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array,
                scaling: float, dropout: float, rng: jax.Array | None) -> jax.Array:
    params = module.variables["params"]
    dropped = dropout > 0.0 and rng is not None
    x_branch = dropout_input(x.astype(y.dtype), dropout, rng) if dropped else x
    kernel = params["kernel"]
    if isinstance(kernel, NF4Tensor):  # DoRA's column norms need W0's values: a QLoRA base dequantizes it here
        kernel = kernel.dequantize().T
    return dora_extra(y, x_branch, kernel, params.get("bias"), a, b, magnitude, scaling,
                      dropped=dropped, precision=module.precision)


def lora_apply(apply_fn: Callable[..., Any], *, strict: bool = True) -> Callable[..., Any]:
    """Wraps ``model.apply`` into ``fn(params, adapter, *args, dropout_rng=None, adapter_names=None, **kwargs)``.

    Args:
        apply_fn: A Flax ``model.apply`` (or any function taking ``{"params": params}`` first).
        strict: See ``lora_interception``.

    Returns:
        A function computing the model's output with every adapted Dense layer's LoRA branch
        added; ``params`` is the frozen tree, ``adapter`` the trainable ``Adapter`` (its config
        travels with it), or an ``AdapterSet`` (its active adapters summed, or with
        ``adapter_names`` a mixed batch, see ``lora_interception``). ``adapter=None`` runs the base
        model. ``params`` may be a QLoRA base (``lora_jax.qlora.quantize_params``): each NF4 kernel is
        dequantized inside the caller's ``jit`` where its layer uses it (``lora_jax.qlora.nf4_dense``). Extra ``kwargs`` (e.g. ``method=`` or ``rngs=``) go to ``apply_fn``.

    Raises:
        TypeError: ``apply_fn`` is not callable.
    """
    if not callable(apply_fn):
        raise TypeError(
            f"lora_apply takes the model's apply function, as lora_apply(model.apply), got {apply_fn!r}. "
            "The config travels inside the Adapter passed at call time: forward(params, adapter, x)."
        )

    def forward(params: Any, adapter: Adapter | AdapterSet | None, *args: Any, dropout_rng: jax.Array | None = None,
                adapter_names: Any = None, **kwargs: Any) -> Any:
        if adapter is None:
            if adapter_names is not None:
                raise TypeError("adapter_names needs an AdapterSet; adapter is None.")
            if not has_nf4(params):
                return apply_fn({"params": params}, *args, **kwargs)
            with _intercepted({}, set(), strict):  # a QLoRA base alone: its NF4 kernels through nf4_dense
                return apply_fn({"params": params}, *args, **kwargs)
        with lora_interception(adapter, dropout_rng=dropout_rng, strict=strict, adapter_names=adapter_names):
            return apply_fn({"params": params}, *args, **kwargs)

    return forward
