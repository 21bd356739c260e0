"""LoRA training on a ``jax.sharding.Mesh``: data parallel, with an FSDP-sharded frozen base.

The mesh always has two axes, outermost first:

- ``data``: plain data parallelism. Every device on it holds the whole (frozen) model.
- ``fsdp``: the frozen base is split across it (ZeRO-3 style); XLA all-gathers each kernel where
  it is used. It is the inner axis, so on several hosts the gathers stay on one host's fast links.

The batch is split over both axes: each device sees ``batch / mesh.size`` rows. A parameter with
2 or more dims is split over ``fsdp`` along its largest dim that ``fsdp`` divides (the first such
dim on ties); vectors and parameters with no divisible dim are replicated. LoRA factors follow
their base kernel, so ``x A`` and ``(x A) B`` need no extra resharding: ``lora_A`` (in, r) takes
the kernel's in-dim split, ``lora_B`` (r, out) its out-dim split. Optimizer moments follow the
LoRA leaf they belong to. Nothing here traces a function: the rules are plain Python on shapes,
so errors come before any compile.

Example:
    >>> import jax.numpy as jnp
    >>> parse_mesh_spec("data=4,fsdp=2")
    {'data': 4, 'fsdp': 2}
    >>> params = {"dense": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)}}
    >>> specs = param_partition_specs(params, fsdp_size=2)
    >>> tuple(specs["dense"]["kernel"]), tuple(specs["dense"]["bias"])
    (('fsdp', None), ())
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.adapter import Adapter
from lora_jax.lora_tree import EMBEDDING_A, LEAF_NAMES, LORA_A, LORA_MAGNITUDE, get_module

__all__ = [
    "MESH_AXES",
    "parse_mesh_spec",
    "make_mesh",
    "leaf_partition_spec",
    "param_partition_specs",
    "lora_partition_specs",
    "param_shardings",
    "lora_shardings",
    "like_lora_shardings",
    "batch_sharding",
    "shard_batch",
    "batch_sharded_activations",
    "TrainShardings",
    "train_shardings",
    "place_train_state",
    "shard_train_step",
]

MESH_AXES = ("data", "fsdp")  # outermost first
KERNEL = "kernel"


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses ``"data=4,fsdp=2"`` into ``{"data": 4, "fsdp": 2}``; an omitted axis has size 1.

    Raises:
        ValueError: An entry is not ``axis=size``, the axis is unknown or repeated, or the size
            is not a positive integer.

    Example:
        >>> parse_mesh_spec("fsdp=8")
        {'data': 1, 'fsdp': 8}
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Mesh spec must be a non-empty string like 'data=4,fsdp=2', got {spec!r}.")
    sizes: dict[str, int] = {}
    for entry in spec.split(","):
        name, sep, size = (part.strip() for part in entry.partition("="))
        if not sep:
            raise ValueError(f"Mesh spec entry {entry!r} must look like 'axis=size', e.g. 'data=4'.")
        if name not in MESH_AXES:
            raise ValueError(f"Unknown mesh axis {name!r} in {spec!r}; the axes are {', '.join(MESH_AXES)}.")
        if name in sizes:
            raise ValueError(f"Mesh axis {name!r} appears twice in {spec!r}; give each axis once.")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"Mesh axis {name!r} needs a positive integer size, got {size!r}.")
        sizes[name] = int(size)
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp)`` mesh over ``devices`` (default: every device of every host).

    Devices are laid out in ``jax.devices()`` order, host by host, so ``fsdp`` (the inner axis)
    spans neighbouring devices.

    Raises:
        ValueError: The axis sizes do not multiply to the number of devices (the message says
            how to simulate devices on CPU), or the spec is malformed.

    Example:
        >>> dict(make_mesh("data=1").shape)
        {'data': 1, 'fsdp': 1}
    """
    if not isinstance(spec, str):  # a mapping gets the same validation as a spec string
        spec = ",".join(f"{axis}={size}" for axis, size in dict(spec).items())
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    needed = math.prod(shape)
    if needed != len(devices):
        raise ValueError(
            f"Mesh {sizes} needs {needed} devices but {len(devices)} are available. "
            "Make the sizes multiply to the device count; on CPU you can simulate N devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported."
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def leaf_partition_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """The rule for one frozen parameter: split its largest ``fsdp``-divisible dim, if any.

    Example:
        >>> tuple(leaf_partition_spec((50257, 768), 2))  # the odd vocab cannot be split
        (None, 'fsdp')
        >>> tuple(leaf_partition_spec((768,), 2))
        ()
    """
    if fsdp_size == 1 or len(shape) < 2:
        return PartitionSpec()
    divisible = [dim for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda d: (shape[d], -d))  # largest; earliest on ties
    return PartitionSpec(*("fsdp" if d == dim else None for d in range(len(shape))))


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def param_partition_specs(params: Any, fsdp_size: int) -> Any:
    """A pytree like ``params`` holding each leaf's ``PartitionSpec`` (see ``leaf_partition_spec``).

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (only shapes are read).
    """
    return jax.tree_util.tree_map(lambda leaf: leaf_partition_spec(np.shape(leaf), fsdp_size), params)


def _kernel_at(params: Any, module_path: Sequence[str]) -> Any:
    module = get_module(params, tuple(module_path))
    if module is not None and KERNEL in module:
        return module[KERNEL]
    if module is not None and "embedding" in module:  # an adapted nn.Embed: its table is its (in, out) kernel
        return module["embedding"]
    raise ValueError(
        f"LoRA module {'.'.join(module_path)!r} has no kernel in params; build the LoRA tree "
        "with init_lora from these same params."
    )


def lora_partition_specs(adapter: Any, params: Any, fsdp_size: int) -> Any:
    """Specs for the LoRA tree: ``lora_A`` keeps the kernel's in-dim split, ``lora_B`` its out-dim.

    Raises:
        ValueError: A LoRA leaf is not ``lora_A``/``lora_B``, or its module has no kernel in
            ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"up": {"kernel": jnp.zeros((4, 8))}}
        >>> from lora_jax.config import LoraConfig
        >>> weights = {"up": {"lora_A": jnp.zeros((4, 2)), "lora_B": jnp.zeros((2, 8))}}
        >>> adapter = Adapter(weights, LoraConfig(rank=2, target_modules=["up"]))
        >>> specs = lora_partition_specs(adapter, params, fsdp_size=2).weights["up"]
        >>> tuple(specs["lora_A"]), tuple(specs["lora_B"])
        ((None, None), (None, 'fsdp'))
    """

    if isinstance(adapter, Adapter):  # the specs of its weights, in an Adapter of the same config
        return Adapter(lora_partition_specs(adapter.weights, params, fsdp_size), adapter.config)

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        names = [_key_name(entry) for entry in path]
        if names[-1] not in LEAF_NAMES:
            raise ValueError(f"Unexpected LoRA leaf {'.'.join(names)!r}; LoRA leaves are named {LEAF_NAMES}.")
        kernel_spec = leaf_partition_spec(np.shape(_kernel_at(params, names[:-1])), fsdp_size)
        in_axis, out_axis = tuple(kernel_spec) + (None,) * (2 - len(kernel_spec))
        if names[-1] == LORA_MAGNITUDE:  # (out,): split like the kernel's out-dim, beside B's columns
            return PartitionSpec(out_axis)
        return PartitionSpec(in_axis, None) if names[-1] in (LORA_A, EMBEDDING_A) else PartitionSpec(None, out_axis)

    return jax.tree_util.tree_map_with_path(spec, adapter)


def _fsdp_size(mesh: Mesh) -> int:
    missing = [axis for axis in MESH_AXES if axis not in mesh.shape]
    if missing:
        raise ValueError(f"Mesh axes {tuple(mesh.shape)} lack {missing}; build the mesh with make_mesh.")
    return mesh.shape["fsdp"]


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per frozen parameter (FSDP over ``fsdp``, replicated over ``data``)."""
    return _named(mesh, param_partition_specs(params, _fsdp_size(mesh)))


def lora_shardings(adapter: Any, params: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per LoRA leaf, consistent with the base kernels in ``params``."""
    return _named(mesh, lora_partition_specs(adapter, params, _fsdp_size(mesh)))


def like_lora_shardings(tree: Any, adapter: Any, adapter_sh: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of the LoRA tree (an optax state).

    A leaf whose key path ends with a LoRA leaf's path and has that leaf's shape (Adam's ``mu``
    and ``nu``) gets that leaf's sharding; everything else (step counts) is replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(adapter),
                                      jax.tree_util.tree_leaves(adapter_sh)):
        by_path[tuple(_key_name(e) for e in path)] = (np.shape(leaf), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        names = tuple(_key_name(e) for e in path)
        for start in range(len(names)):
            match = by_path.get(names[start:])
            if match is not None and match[0] == np.shape(leaf):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over every device: ``data`` x ``fsdp``."""
    _fsdp_size(mesh)
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a batch pytree with ``batch_sharding``; on several hosts each passes its own rows.

    Raises:
        ValueError: A leaf's leading dim is not divisible by the devices that hold it.
    """
    sharding = batch_sharding(mesh)
    per_process = mesh.size // jax.process_count()
    for leaf in jax.tree_util.tree_leaves(batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % per_process:
            raise ValueError(
                f"Batch leaf of shape {np.shape(leaf)} cannot be split over {per_process} local devices; "
                f"use a per-host batch size that is a multiple of {per_process}."
            )
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


@contextlib.contextmanager
def batch_sharded_activations(mesh: Mesh) -> Iterator[None]:
    """Within the block, every ``nn.Dense`` output is constrained to be split over the batch axes.

    Without it the compiler may propagate a kernel's FSDP split into the activations and keep
    them whole over the batch instead, so each device holds ``fsdp`` times the activations (it
    did: GPT-2 XL under ``fsdp=8`` planned 4x the temporaries of ``data=8``). Pinning the
    activations makes it all-gather the (small, frozen) kernels instead, which is what FSDP means.
    Use it only where the leading dim is the global batch (a train step, not generation).
    """
    batch_axes = PartitionSpec(MESH_AXES)

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return out
        spec = PartitionSpec(*batch_axes, *([None] * (out.ndim - 1)))
        return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))

    with nn.intercept_methods(interceptor):
        yield


class TrainShardings(NamedTuple):
    """Where each argument of ``step(adapter, opt_state, frozen, batch, rng)`` lives on the mesh."""

    adapter: Any
    opt_state: Any
    frozen: Any
    batch: NamedSharding
    replicated: NamedSharding


def train_shardings(frozen: Any, adapter: Any, opt_state: Any, mesh: Mesh) -> TrainShardings:
    """All shardings of a LoRA train state; ``opt_state`` may be arrays or shape structs."""
    adapter_sh = lora_shardings(adapter, frozen, mesh)
    return TrainShardings(
        adapter=adapter_sh,
        opt_state=like_lora_shardings(opt_state, adapter, adapter_sh, mesh),
        frozen=param_shardings(frozen, mesh),
        batch=batch_sharding(mesh),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def place_train_state(frozen: Any, adapter: Any, opt_state: Any, mesh: Mesh) -> tuple[Any, Any, Any]:
    """Moves ``(frozen, adapter, opt_state)`` onto the mesh with the shardings above.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> frozen = {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}}
        >>> from lora_jax.config import LoraConfig
        >>> weights = {"up": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.zeros((2, 8))}}
        >>> adapter = Adapter(weights, LoraConfig(rank=2, target_modules=["up"]))
        >>> mesh = make_mesh("data=1")
        >>> f, a, s = place_train_state(frozen, adapter, optax.adam(1e-3).init(adapter), mesh)
        >>> tuple(a.weights["up"]["lora_B"].sharding.spec)
        (None, None)
    """
    sh = train_shardings(frozen, adapter, opt_state, mesh)
    placed = jax.device_put(adapter, sh.adapter)
    return jax.device_put(frozen, sh.frozen), placed, jax.device_put(opt_state, sh.opt_state)


def shard_train_step(
    step: Callable[..., Any], frozen: Any, adapter: Any, opt_state: Any, mesh: Mesh, *, donate: bool = True
) -> Callable[..., Any]:
    """Jits ``step(adapter, opt_state, frozen, batch, rng)`` with every sharding pinned.

    Left to itself the compiler may hand back LoRA or Adam leaves split differently from how
    they came in (it did for ``lora_A`` under FSDP), and the next call then compiles again.
    Pinning inputs and outputs keeps one compiled step and the layout of ``train_shardings``;
    the compiler inserts the FSDP all-gathers and the gradient all-reduce over the batch axes.
    ``step`` may already be jitted (``lora_jax.make_train_step``): its plain function is traced
    again, inside ``batch_sharded_activations``.

    Args:
        step: Returns ``(adapter, opt_state, metrics)``; metrics come back replicated.
        frozen, adapter, opt_state: The state (arrays or ``jax.ShapeDtypeStruct``) whose shapes
            fix the shardings.
        mesh: From ``make_mesh``.
        donate: Donate ``adapter`` and ``opt_state`` so they are updated in place.
    """
    sh = train_shardings(frozen, adapter, opt_state, mesh)
    # Trace the plain function, not a jitted wrapper whose cached trace lacks the constraints.
    plain_step = getattr(step, "__wrapped__", step)

    def constrained_step(*args: Any) -> Any:
        with batch_sharded_activations(mesh):
            return plain_step(*args)

    return jax.jit(
        constrained_step,
        in_shardings=(sh.adapter, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
        out_shardings=(sh.adapter, sh.opt_state, sh.replicated),
        donate_argnums=(0, 1) if donate else (),
    )
