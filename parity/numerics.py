"""Where and at what precision the two halves run: device, dtype, matmul precision.

Parity in float32 needs both frameworks to do true float32 matmuls. Torch may use
TF32 on Ampere+ GPUs (10-bit mantissa) and XLA may use bf16 passes on GPU/TPU for
``DEFAULT`` precision; either alone turns a 1e-6 agreement into 1e-3. The
:func:`parity_numerics` context turns both off for its duration and restores the
previous settings afterwards, so importing or testing ``parity`` never changes
another package's numerics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

DEVICES = ("cpu", "gpu")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Placement:
    """A device resolved for both frameworks.

    Attributes:
        name: ``"cpu"`` or ``"gpu"``.
        torch_device: The torch device string (``"cpu"`` or ``"cuda"``).
        jax_device: The ``jax.Device`` arrays are placed on.
        description: Human-readable device name for reports.
    """

    name: str
    torch_device: str
    jax_device: object
    description: str


def check_dtype(dtype: str) -> str:
    """Validates a dtype name.

    >>> check_dtype("fp32")
    'fp32'
    >>> check_dtype("float16")
    Traceback (most recent call last):
    ...
    ValueError: Unknown dtype 'float16'; choose one of fp32, bf16.
    """
    return _one_of("dtype", dtype, DTYPES)


def _one_of(kind: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(choices)}.")
    return value


def resolve_device(name: str) -> Placement:
    """Finds ``name`` in both frameworks, or says which one lacks it and what to do.

    Args:
        name: ``"cpu"`` or ``"gpu"``.

    Returns:
        The resolved :class:`Placement`.

    Raises:
        ValueError: ``name`` is not a known device.
        RuntimeError: a GPU was requested but torch or JAX cannot see one.

    >>> resolve_device("cpu").torch_device
    'cpu'
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    ValueError: Unknown device 'tpu'; choose one of cpu, gpu.
    """
    _one_of("device", name, DEVICES)
    import jax
    import torch

    if name == "cpu":
        return Placement("cpu", "cpu", jax.devices("cpu")[0], _cpu_description())
    missing = []
    if not torch.cuda.is_available():
        missing.append(f"torch {torch.__version__} sees no CUDA device")
    try:
        jax_gpus = jax.devices("gpu")
    except RuntimeError:
        jax_gpus = []
    if not jax_gpus:
        missing.append(f"jax {jax.__version__} has no GPU backend (backends: {jax.default_backend()})")
    if missing:
        raise RuntimeError(
            "--device gpu needs a GPU visible to both frameworks, but " + "; ".join(missing)
            + ". Run with --device cpu, or install CUDA builds of torch and jax (jax[cuda12]).")
    return Placement("gpu", "cuda", jax_gpus[0], torch.cuda.get_device_name(0))


def _cpu_description() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


@contextlib.contextmanager
def parity_numerics() -> Iterator[None]:
    """True float32 matmuls in both frameworks for the duration of the block.

    Torch: TF32 off for matmul and cuDNN, ``float32_matmul_precision("highest")``.
    JAX: ``jax.default_matmul_precision("highest")``. Previous settings come back on exit.

    >>> import torch
    >>> with parity_numerics():
    ...     torch.get_float32_matmul_precision()
    'highest'
    """
    import jax
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
