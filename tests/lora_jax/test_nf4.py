"""lora_jax.nf4 against the real bitsandbytes: codes byte for byte, statistics, dequantized bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import nf4
from lora_jax.nf4 import NF4Tensor, quantize_nf4

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16),
          "float16": (torch.float16, np.float16)}
SMALL_SHAPES = [(1,), (2,), (63,), (64,), (65,), (1000,), (15617,), (3, 80), (7, 9, 5), (130, 33)]


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    # bitsandbytes torch.compiles its fallback dequantize (odd last dims); eager runs the same float32 math, faster here.
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def _weights(shape, dtype_name, seed=0):
    torch_dtype, _ = DTYPES[dtype_name]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    return torch.from_numpy(x).to(torch_dtype)


def _to_numpy(t):
    return t.float().numpy().astype(DTYPES[str(t.dtype).removeprefix("torch.")][1])


def _bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize]).reshape(-1)


def mismatches(ours: NF4Tensor, t, *, double_quant: bool) -> dict[str, int]:
    """Counts of unequal codes bytes, statistics and dequantized bit patterns (-1: a length differs)."""
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)

    def count(a, b):
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        return -1 if a.shape != b.shape else int((a != b).sum())

    out = {"codes": count(ours.codes, packed.numpy()), "absmax": count(ours.absmax, state.absmax.numpy())}
    if double_quant:
        theirs_nested = state.state2.absmax.numpy() if state.nested else np.zeros(0)
        out["nested_absmax"] = count(ours.nested_absmax, theirs_nested)
        out["offset"] = count(ours.offset, np.float32(state.offset.item()) if state.nested else np.nan)
    reference = F.dequantize_4bit(packed, state, quant_type="nf4")
    # bitsandbytes hands a 1-D tensor back as (1, n) or (n, 1); the values are compared in row-major order.
    out["dequantized"] = count(_bits(jax.jit(NF4Tensor.dequantize)(ours)), _bits(reference.numpy() if
                               reference.dtype == torch.float32 else reference.view(torch.int16).numpy()))
    return out


def _ok(counts):
    return all(v == 0 for v in counts.values())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_bit_exact_with_bitsandbytes(shape, dtype_name, double_quant):
    t = _weights(shape, dtype_name)
    counts = mismatches(quantize_nf4(_to_numpy(t), double_quant=double_quant), t, double_quant=double_quant)
    assert _ok(counts), counts


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_bit_exact_gpt2_sized_kernel(dtype_name):
    # GPT-2 small's c_attn as bitsandbytes sees it (Linear4bit's (out, in)): 27,648 blocks, 108 nested blocks.
    t = _weights((2304, 768), dtype_name, seed=1)
    q = quantize_nf4(_to_numpy(t))
    assert q.codes.shape == (2304 * 768 // 2,) and q.absmax.shape == (27648,) and q.nested_absmax.shape == (108,)
    counts = mismatches(q, t, double_quant=True)
    assert _ok(counts), counts


def _near_midpoints(table: np.ndarray, ulps: int = 6) -> np.ndarray:
    """Values at and around each midpoint of a sorted code table, the cases that decide a rounding rule."""
    mids = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)
    around = [mids]
    up, down = mids.copy(), mids.copy()
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        around += [up, down]
    return np.concatenate(around).astype(np.float32)


def _blocks_with_absmax_one(values: np.ndarray, block_size: int) -> np.ndarray:
    """Each block starts with 1.0, so the scaled values are the values themselves."""
    per_block = block_size - 1
    blocks = -(values.size // -per_block)
    out = np.zeros((blocks, block_size), np.float32)
    out[:, 0] = 1.0
    out[:, 1:] = np.pad(values, (0, blocks * per_block - values.size)).reshape(blocks, per_block)
    return out.reshape(-1)


def test_bit_exact_at_the_nf4_midpoints():
    x = _blocks_with_absmax_one(_near_midpoints(nf4.NF4_VALUES, ulps=20), 64)
    counts = mismatches(quantize_nf4(x, double_quant=False), torch.from_numpy(x), double_quant=False)
    assert _ok(counts), counts


def test_nested_code_search_is_the_cpp_grid_not_midpoints():
    """bitsandbytes' C++ 8-bit kernel rounds onto a 65,536-point grid before it picks a code."""
    x = _blocks_with_absmax_one(_near_midpoints(nf4.dynamic_map()[1:-1], ulps=3), 256)
    codes, state = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    ours, absmax = nf4._quantize_blocks_8bit(x, 256)
    assert np.array_equal(ours, codes.numpy()) and np.array_equal(absmax, state.absmax.numpy())
    mids = ((nf4.dynamic_map()[:-1] + nf4.dynamic_map()[1:]) / np.float32(2)).astype(np.float32)
    by_midpoints = np.searchsorted(mids, x, side="left")
    assert (by_midpoints != codes.numpy()).sum() > 100  # 920 of 1,771 values near the midpoints, measured


def test_tables_equal_bitsandbytes():
    assert np.array_equal(nf4.dynamic_map(), F.create_dynamic_map().numpy())
    assert np.array_equal(nf4.NF4_VALUES, F.get_4bit_type("nf4", device="cpu").numpy())


# Planted bugs: each one, fed through the same comparison, must show up as mismatches.

def _x_for_bugs():
    return np.concatenate([_blocks_with_absmax_one(_near_midpoints(nf4.NF4_VALUES, ulps=20), 64),
                           _weights((4096,), "float32").numpy()])


def test_planted_bug_swapped_nibbles(monkeypatch):
    monkeypatch.setattr(nf4, "_pack", lambda q: ((q[1::2] << 4) | q[0::2]).astype(np.uint8))
    x = _x_for_bugs()
    counts = mismatches(quantize_nf4(x), torch.from_numpy(x), double_quant=True)
    assert counts["codes"] > 0 and counts["dequantized"] > 0, counts


def test_planted_bug_argmin_rounding(monkeypatch):
    def argmin(scaled):
        return np.abs(scaled[:, None] - nf4.NF4_VALUES[None, :]).argmin(axis=-1).astype(np.uint8)

    monkeypatch.setattr(nf4, "_bucket", argmin)
    x = _x_for_bugs()
    counts = mismatches(quantize_nf4(x), torch.from_numpy(x), double_quant=True)
    assert counts["codes"] > 0 and counts["dequantized"] > 0, counts


def test_planted_bug_double_quant_without_offset(monkeypatch):
    monkeypatch.setattr(nf4, "_absmax_offset", lambda absmax: np.float32(0))
    x = _x_for_bugs()
    counts = mismatches(quantize_nf4(x), torch.from_numpy(x), double_quant=True)
    assert counts["offset"] == 1 and counts["absmax"] > 0 and counts["dequantized"] > 0, counts


def test_planted_bug_block_size_128():
    x = _x_for_bugs()
    counts = mismatches(quantize_nf4(x, block_size=128), torch.from_numpy(x), double_quant=True)
    assert counts["absmax"] == -1 and counts["dequantized"] > 0, counts


# The value itself.

@pytest.mark.parametrize("block_size", [0, 16, 48, 100, 8192])
def test_bad_block_size_names_the_accepted_ones(block_size):
    with pytest.raises(ValueError, match=r"\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"):
        quantize_nf4(np.ones(64, np.float32), block_size=block_size)


def test_bad_dtype_and_empty():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_nf4(np.ones(64, np.float64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(np.ones((0, 3), np.float32))


def test_pytree_leaves_and_static_fields():
    q = quantize_nf4(np.ones((4, 32), np.float32))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.dtype for leaf in leaves] == [np.uint8, np.uint8, np.float32, np.float32]
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (again.shape, again.dtype, again.block_size) == ((4, 32), np.float32, 64)
    plain = quantize_nf4(np.ones((4, 32), np.float32), double_quant=False)
    assert len(jax.tree_util.tree_leaves(plain)) == 2 and not plain.double_quant


def test_dequantize_dtype_override_rounds_once():
    x = _weights((5, 64), "float32").numpy()
    q = quantize_nf4(x)
    full = np.asarray(q.dequantize())
    assert np.array_equal(_bits(q.dequantize(jnp.bfloat16)), _bits(full.astype(jnp.bfloat16)))


def test_zero_tensor():
    # An all-zero tensor: exact codes and statistics. With double quantization the partial block's
    # absmax is bitsandbytes' clamp, 1e-38, a subnormal; bitsandbytes then dequantizes to -0.0 where
    # XLA, which flushes subnormals to zero on CPU, gives +0.0. The values are equal, the sign bits not.
    x = torch.zeros(130)
    for double_quant in (False, True):
        q = quantize_nf4(x.numpy(), double_quant=double_quant)
        counts = mismatches(q, x, double_quant=double_quant)
        assert all(counts[k] == 0 for k in counts if k != "dequantized"), counts
        assert np.array_equal(np.asarray(q.dequantize()), np.zeros(130, np.float32))
