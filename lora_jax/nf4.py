"""NF4 (4-bit NormalFloat) quantization, bit for bit the one bitsandbytes makes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores a frozen base in NF4 with double-quantized
statistics. ``quantize_nf4`` reproduces ``bitsandbytes.functional.quantize_4bit(x, blocksize=64,
quant_type="nf4", compress_statistics=...)`` on the row-major flattening of ``x``:

- blocks of ``block_size`` values; the absmax of each block; values scaled by multiplying with the
  absmax's float32 reciprocal, except the last, partial block, which divides by its absmax;
- clamp to [-1, 1], then the index of the NF4 value: the number of midpoints between consecutive
  NF4 values that lie strictly below the scaled value (bitsandbytes' ``torch.bucketize``);
- two codes per byte, the first in the high nibble; an odd count pads one scaled zero (code 7).

Double quantization subtracts the float32 mean of the absmax values and quantizes the rest with the
8-bit dynamic map in blocks of 256, following bitsandbytes' CPU C++ kernel
(``quantize_cpu_impl`` in ``csrc/cpu_ops.cpp``). That kernel does not bucket against midpoints
directly: it maps ``v = clamp(x / absmax, -1, 1)`` onto a 65,536-step grid,
``trunc((v + 1) * 0.5 * 65535 + 0.5)``, and reads a table built once for the grid's points
``-1 + 2 i / 65535``: the code whose midpoint interval holds the grid point. A value is thus
rounded to the nearest of 65,536 grid points before its code is chosen, so values within half a
grid step of a midpoint can land on the other side of it.

Quantization runs once, on the host, in NumPy float32. ``NF4Tensor.dequantize`` is pure JAX, so
it runs inside ``jit`` where the kernel is used; it computes ``code * absmax`` in float32 and
rounds once to the output dtype, as ``bitsandbytes.functional.dequantize_4bit`` does.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> w = jax.random.normal(jax.random.key(0), (8, 24)) * 0.02
    >>> q = quantize_nf4(w)
    >>> q.codes.shape, q.codes.dtype, q.absmax.dtype, q.shape
    ((96,), dtype('uint8'), dtype('uint8'), (8, 24))
    >>> w_hat = jax.jit(lambda q: q.dequantize())(q)
    >>> w_hat.shape, w_hat.dtype, bool(jnp.abs(w_hat - w).max() < 0.01)
    ((8, 24), dtype('float32'), True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The block sizes ``bitsandbytes.functional.quantize_4bit`` accepts."""
NESTED_BLOCK_SIZE = 256
"""bitsandbytes quantizes the (offset) absmax values in blocks of 256."""
INPUT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))

# bitsandbytes' NF4 table (get_4bit_type("nf4")), normalised by its max, which is 1.0.
NF4_VALUES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
_NF4_MIDPOINTS = ((NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)).astype(np.float32)
_GRID = 65535  # the C++ kernel's table has 65,536 entries over [-1, 1]


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` on CPU.

    The first half counts up from ``start``, the rest down from ``end``, and each ``start + step * i``
    is one fused multiply-add (one rounding): a plain float32 multiply then add differs in 1 ulp
    for a few of the dynamic map's values.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps)
    from_start = (step * idx + np.float64(start32)).astype(np.float32)  # exact in float64, then rounded once
    from_end = (np.float64(end32) - step * (steps - idx - 1)).astype(np.float32)
    return np.where(idx < steps // 2, from_start, from_end).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map of ``bitsandbytes.functional.create_dynamic_map()``, sorted.

    Exponents 1e-6 ... 1e0, each with a linear fraction of ``2**i`` means of a ``linspace(0.1, 1)``,
    both signs, plus 0 and 1: 256 float32 values in [-0.993, 1].
    """
    values: list[np.ndarray] = []
    for i in range(7):
        bounds = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scaled = (np.float32(10.0 ** (i - 6)) * means).astype(np.float32)
        values += [scaled, -scaled]
    values.append(np.array([0.0, 1.0], np.float32))
    out = np.sort(np.concatenate(values))
    out.setflags(write=False)
    return out


@functools.cache
def _dynamic_grid_table() -> np.ndarray:
    """The C++ kernel's table: for grid point ``-1 + 2 i / 65535``, how many midpoints lie below it."""
    code = dynamic_map()
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1) + (np.float32(2) * np.arange(_GRID + 1, dtype=np.float32)) / np.float32(_GRID))
    table = np.searchsorted(midpoints, grid.astype(np.float32), side="left").astype(np.uint8)
    table.setflags(write=False)
    return table


def _grid_index(scaled: np.ndarray) -> np.ndarray:
    """``uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)``, the last multiply-add fused (one rounding)."""
    half = ((np.clip(scaled, -1, 1).astype(np.float32) + np.float32(1)) * np.float32(0.5)).astype(np.float32)
    # half * 65535 is exact in float64 and so is + 0.5; one rounding to float32 is what an FMA does.
    return (half.astype(np.float64) * _GRID + 0.5).astype(np.float32).astype(np.uint16)


def _bucket(scaled: np.ndarray) -> np.ndarray:
    """NF4 code of each scaled value: the count of NF4 midpoints strictly below it."""
    return np.searchsorted(_NF4_MIDPOINTS, scaled, side="left").astype(np.uint8)


def _pack(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble."""
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def _absmax_offset(absmax: np.ndarray) -> np.float32:
    """The float32 mean of the absmax values, as ``torch.Tensor.mean`` computes it.

    torch sums float32 in a cascade whose order depends on the vector width and thread count, so
    its mean can differ from the correctly rounded one in the last bit. torch's own mean is used
    when torch is installed (it is wherever bitsandbytes is); otherwise the correctly rounded one.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the dev environment
        return np.float32(absmax.mean(dtype=np.float64))
    return np.float32(torch.from_numpy(np.ascontiguousarray(absmax)).mean().item())


def _quantize_blocks_4bit(flat: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed NF4 codes and float32 absmax of a flat float32 array (bitsandbytes' quantize_4bit)."""
    n = flat.size
    full = n - n % block_size
    blocks = flat[:full].reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=-1) if full else np.zeros(0, np.float32)
    # bitsandbytes clamps the absmax at 1e-38 before taking its reciprocal (a zero block gives code 7).
    inverse = (np.float32(1) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)
    if full < n:  # the last, partial block divides, and keeps its clamped absmax
        tail_absmax = np.maximum(np.abs(flat[full:]).max(), np.float32(1e-38))
        absmax = np.concatenate([absmax, [tail_absmax]])
        scaled = np.concatenate([scaled, np.clip(flat[full:] / tail_absmax, -1, 1)])
    if n % 2:
        scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
    return _pack(_bucket(scaled.astype(np.float32))), absmax.astype(np.float32)


def _quantize_blocks_8bit(values: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit dynamic-map codes and float32 absmax, as bitsandbytes' CPU C++ blockwise kernel makes them."""
    n = values.size
    blocks = -(n // -block_size)
    padded = np.zeros(blocks * block_size, np.float32)
    padded[:n] = values
    padded = padded.reshape(blocks, block_size)
    absmax = np.abs(padded).max(axis=-1).astype(np.float32)
    safe = np.where(absmax == 0, np.float32(1), absmax)
    scaled = (padded * (np.float32(1) / safe)[:, None]).astype(np.float32)
    codes = _dynamic_grid_table()[_grid_index(scaled)]
    codes = np.where(absmax[:, None] == 0, np.uint8(0), codes)  # an all-zero block stores code 0
    return codes.reshape(-1)[:n].astype(np.uint8), absmax


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size={block_size!r} is not one bitsandbytes accepts for 4-bit quantization; "
            f"use one of {BLOCK_SIZES} (QLoRA and transformers use 64)."
        )


@functools.partial(jax.tree_util.register_dataclass, data_fields=("codes", "absmax", "nested_absmax", "offset"),
                   meta_fields=("shape", "dtype", "block_size"))
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """An NF4-quantized tensor: a pytree whose leaves are the codes and statistics.

    Attributes:
        codes: uint8, ``ceil(n / 2)`` bytes, two codes per byte, the first in the high nibble.
        absmax: float32 per block, or with double quantization its uint8 dynamic-map codes.
        nested_absmax: with double quantization, the float32 absmax per 256 blocks; else ``None``.
        offset: with double quantization, the float32 scalar mean subtracted before it; else ``None``.
        shape: the tensor's shape (static).
        dtype: the input's dtype, the default of ``dequantize`` (static).
        block_size: values per block (static).
    """

    codes: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    block_size: int

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block, decoding the double quantization if there is one."""
        if not self.double_quant:
            return jnp.asarray(self.absmax, jnp.float32)
        blocks = self.absmax.shape[0]
        nested = -(blocks // -NESTED_BLOCK_SIZE)
        values = jnp.asarray(dynamic_map())[self.absmax.astype(jnp.int32)]
        values = jnp.pad(values, (0, nested * NESTED_BLOCK_SIZE - blocks)).reshape(nested, NESTED_BLOCK_SIZE)
        scaled = (values * self.nested_absmax[:, None]).reshape(-1)[:blocks]
        # bitsandbytes rounds the product to float32 before it adds the offset. XLA would fuse the two
        # into one FMA (one rounding); a select between them stops that (an optimization_barrier does not).
        scaled = jnp.where(scaled == scaled, scaled, jnp.float32(0))
        return scaled + self.offset

    def dequantize(self, dtype: Any = None, *, after: jax.Array | None = None) -> jax.Array:
        """``bitsandbytes.functional.dequantize_4bit`` for this tensor: ``code * absmax`` in float32, then ``dtype``.

        Args:
            dtype: output dtype; default the input's.
            after: an array this dequantization must wait for, e.g. the layer's input. ``int(0 * after[0])``
                is added to the codes, which changes nothing for a finite ``after`` but stops XLA from running
                the dequantization before ``after`` exists, or from merging it with another dequantization of
                the same codes (XLA's CPU pipeline drops optimization barriers before it schedules, so they
                cannot do this). XLA does not simplify ``0 * a`` for floats.

        Returns:
            An array of ``self.shape``.
        """
        n, bs = self.size, self.block_size
        codes = self.codes.astype(jnp.int32)
        if after is not None:  # an int zero XLA cannot see through: 0 * a is not simplified for floats
            codes = codes + (jnp.zeros((), jnp.float32) * jnp.reshape(after, -1)[0].astype(jnp.float32)).astype(jnp.int32)
        nibbles = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)[:n]
        values = jnp.asarray(NF4_VALUES)[nibbles]
        blocks = -(n // -bs)
        values = jnp.pad(values, (0, blocks * bs - n)).reshape(blocks, bs)
        out = (values * self.block_absmax()[:, None]).reshape(-1)[:n]
        return out.astype(self.dtype if dtype is None else dtype).reshape(self.shape)


def quantize_nf4(x: Any, *, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantizes ``x`` to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does on CPU.

    Runs on the host (NumPy), once per tensor; ``NF4Tensor.dequantize`` is the part that runs in ``jit``.

    Args:
        x: float32, bfloat16 or float16 array of any shape, flattened row-major.
        block_size: values per block; one of ``BLOCK_SIZES``.
        double_quant: quantize the absmax values again (bitsandbytes' ``compress_statistics``).

    Returns:
        The ``NF4Tensor``.

    Raises:
        ValueError: for a block size bitsandbytes does not accept, another dtype, or an empty tensor.
    """
    check_block_size(block_size)
    array = np.asarray(x)
    if array.dtype not in INPUT_DTYPES:
        raise ValueError(f"quantize_nf4 takes float32, bfloat16 or float16 (as bitsandbytes), got {array.dtype}.")
    if array.size == 0:
        raise ValueError("quantize_nf4 got an empty tensor; there is nothing to quantize.")
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    codes, absmax = _quantize_blocks_4bit(flat, block_size)
    nested_absmax = offset = None
    if double_quant:
        offset = _absmax_offset(absmax)
        absmax, nested_absmax = _quantize_blocks_8bit((absmax - offset).astype(np.float32), NESTED_BLOCK_SIZE)
        nested_absmax, offset = jnp.asarray(nested_absmax), jnp.asarray(offset, jnp.float32)
    return NF4Tensor(codes=jnp.asarray(codes), absmax=jnp.asarray(absmax), nested_absmax=nested_absmax, offset=offset,
                     shape=tuple(array.shape), dtype=array.dtype, block_size=block_size)
