"""Stage 0 of ``--quantize nf4``: the JAX NF4 base is bitsandbytes' own, byte for byte and bit for bit.

For every kernel, the ``NF4Tensor`` that ``lora_jax`` made is compared with the ``Linear4bit`` of two
bitsandbytes bases built from the same checkpoint: ``lora_torch.quantize_base`` (the torch half) and
transformers' 4-bit loading (the base of the PEFT rows). Rows, per base:

- the set of quantized layers (GPT-2: c_attn, c_proj, c_fc, c_proj of each block; never the tied head);
- the packed NF4 codes, as bytes (two codes per byte, the first in the high nibble);
- the statistics: the absmax per block (with double quantization its 8-bit codes), the nested absmax
  per 256 blocks and the mean offset, compared as bits (a block size of 128 shows as a count mismatch);
- the dequantized kernels: ``NF4Tensor.dequantize`` under ``jit`` against ``bitsandbytes.functional.
  dequantize_4bit``, which must be bit-identical (abs 0).

All four are exact: they are integer codes and the float32 results of the same operations in the same
order.

A checkpoint's weights almost never sit on a rounding boundary, so a rounding rule that differs from
bitsandbytes' only there (nearest-value argmin in place of its midpoint bucketing) would pass them. The
stage also quantizes an edge probe (:func:`edge_probe`: blocks of values at and within 20 float32 ulps of
every NF4 midpoint, each block's absmax exactly 1, then ordinary weights) through the JAX half's
quantizer (``impl.quantize_jax``) and through bitsandbytes (``lora_torch.quantize.linear4bit``, transformers'
steps), and compares codes, statistics and dequantized values the same way. The bytes are read from layers no forward has repacked (``parity.quantized``); a layer whose
state says it was (``packing_format_for_cpu``) fails its rows instead of being compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.pair import ModelPair
from parity.results import EXACT, CheckResult, StageResult, compare_exact, compare_named_arrays, failed

STAGE = "quantization"
_REPACKED = ("bitsandbytes repacked these bytes (an AVX512-BF16 eval forward); they are no longer its quantization, "
             "so they are not compared: read a layer's bytes before any forward")


def jax_nf4_kernels(params: Any) -> dict[str, Any]:
    """``{dotted module name: NF4Tensor}`` of a QLoRA params tree (the module holding the ``kernel``).

    >>> import numpy as np
    >>> from lora_jax.nf4 import quantize_nf4
    >>> list(jax_nf4_kernels({"h": {"0": {"c_fc": {"kernel": quantize_nf4(np.ones((4, 64), np.float32)),
    ...                                             "bias": np.zeros(4)}}}}))
    ['h.0.c_fc']
    """
    import jax
    from lora_jax.nf4 import NF4Tensor

    found = {}
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda leaf: isinstance(leaf, NF4Tensor))
    for path, leaf in leaves:
        if isinstance(leaf, NF4Tensor):
            found[".".join(str(getattr(key, "key", key)) for key in path[:-1])] = leaf
    return found


def torch_4bit_layers(model: Any) -> dict[str, Any]:
    """``{dotted name: bitsandbytes Linear4bit}`` of a torch model, in module order."""
    from lora_torch.quantize import is_linear4bit

    return {name: module for name, module in model.named_modules() if is_linear4bit(module)}


def _bits(values: Any) -> np.ndarray:
    """A flat array whose equality is bit equality (float32 viewed as uint32: -0.0 != +0.0)."""
    array = np.ascontiguousarray(np.asarray(values)).reshape(-1)
    return array.view(np.uint32) if array.dtype == np.float32 else array


def _count_differing(ours: Any, theirs: Any) -> int:
    """How many entries differ; every entry when the sizes differ (another block size, a missing table)."""
    if ours is None or theirs is None:
        return 0 if ours is None and theirs is None else int(np.size(theirs if ours is None else ours))
    a, b = _bits(ours), _bits(theirs)
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.size, b.size)
    return int(np.count_nonzero(a != b))


def edge_probe(shape: tuple[int, int] = (96, 128), ulps: int = 20, seed: int = 0) -> np.ndarray:
    """An (out, in) float32 weight whose first blocks of 64 put values at and around every NF4 midpoint.

    Each of those blocks starts with 1.0, so its absmax is 1 and the scaled values are the values themselves;
    the rest are N(0, 0.02) weights, so double quantization has many blocks to work on.

    >>> probe = edge_probe()
    >>> probe.shape, probe.dtype, float(probe[0, 0]), float(np.abs(probe[0, :64]).max())
    ((96, 128), dtype('float32'), 1.0, 1.0)
    """
    from lora_jax.nf4 import NF4_VALUES

    mids = ((NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)).astype(np.float32)
    around, up, down = [mids], mids.copy(), mids.copy()
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        around += [up, down]
    values = np.concatenate(around)
    blocks = -(values.size // -63)
    edge = np.zeros((blocks, 64), np.float32)
    edge[:, 0] = 1.0
    edge[:, 1:] = np.pad(values, (0, blocks * 63 - values.size)).reshape(blocks, 63)
    rest = np.random.default_rng(seed).normal(0.0, 0.02, size=int(np.prod(shape)) - edge.size).astype(np.float32)
    return np.concatenate([edge.reshape(-1), rest]).reshape(shape)


def _probe_rows(pair: ModelPair) -> list[CheckResult]:
    """The edge probe through the JAX half's quantizer and through bitsandbytes: codes, statistics, values."""
    import jax
    import torch
    from lora_torch.quantize import dequantize_weight, linear4bit

    probe = edge_probe()
    ours = jax_nf4_kernels(pair.impl.quantize_jax({"probe": {"kernel": probe.T}}))  # a Dense kernel is (in, out)
    layer = linear4bit(torch.from_numpy(probe), None, block_size=64, double_quant=True, compute_dtype=torch.float32)
    dequantized = np.asarray(jax.jit(lambda q: q.dequantize())(ours["probe"]), np.float32)
    label = "edge probe (values at NF4 midpoints)"
    return [
        _table_row(f"NF4 codes JAX vs bitsandbytes, {label}", ours, {"probe": layer}, ("codes",)),
        _table_row(f"absmax codes, nested absmax, offset JAX vs bitsandbytes, {label}", ours, {"probe": layer},
                   ("absmax", "nested absmax", "offset")),
        compare_named_arrays(STAGE, f"dequantized JAX vs bitsandbytes, {label}", {"probe": dequantized},
                             {"probe": dequantize_weight(layer).detach().float().numpy()}, EXACT),
    ]


def _jax_tables(q: Any) -> dict[str, Any]:
    offset = None if q.offset is None else np.asarray(q.offset, np.float32).reshape(1)
    nested = None if q.nested_absmax is None else np.asarray(q.nested_absmax)
    return {"codes": np.asarray(q.codes), "absmax": np.asarray(q.absmax), "nested absmax": nested, "offset": offset}


def _torch_tables(layer: Any) -> dict[str, Any]:
    state = layer.weight.quant_state
    nested = state.nested
    return {"codes": layer.weight.data.detach().cpu().numpy(), "absmax": state.absmax.detach().cpu().numpy(),
            "nested absmax": state.state2.absmax.detach().cpu().numpy() if nested else None,
            "offset": state.offset.detach().cpu().numpy().reshape(1) if nested else None}


def _table_row(name: str, jax_q: dict[str, Any], layers: dict[str, Any], tables: tuple[str, ...]) -> CheckResult:
    """One exact row over every layer: the count of entries of ``tables`` that differ, the worst layer named."""
    total, differing, worst, worst_count, block = 0, 0, "", 0, set()
    for module in sorted(set(jax_q) & set(layers)):
        if getattr(layers[module].weight.quant_state, "packing_format_for_cpu", False):
            return failed(STAGE, name, EXACT, f"{module}: {_REPACKED}")
        ours, theirs = _jax_tables(jax_q[module]), _torch_tables(layers[module])
        count = sum(_count_differing(ours[t], theirs[t]) for t in tables)
        total += sum(int(np.size(theirs[t])) for t in tables if theirs[t] is not None)
        block.add((jax_q[module].block_size, layers[module].weight.quant_state.blocksize))
        differing += count
        if count > worst_count:
            worst, worst_count = module, count
    sizes = ", ".join(f"JAX {a} vs {b}" for a, b in sorted(block) if a != b)
    if differing:
        detail = f"{differing} of {total} differ; worst {worst} ({worst_count})" + (f"; block size {sizes}" if sizes
                                                                                      else "")
    else:
        detail = f"{len(set(jax_q) & set(layers))} layers, {total:,} values identical"
    return CheckResult(stage=STAGE, name=name, max_abs=float(differing), max_rel=differing / max(total, 1),
                       tolerance=EXACT, passed=differing == 0, detail=detail)


def _dequantized_row(name: str, pair: ModelPair, jax_q: dict[str, Any], layers: dict[str, Any]) -> CheckResult:
    from lora_torch.quantize import dequantize_weight

    from parity.transfer import jax_kernel

    modules = sorted(set(jax_q) & set(layers))
    dense = pair.jax_float_params()  # NF4Tensor.dequantize under jit, transposed back to (in, out)
    ours = {m: np.asarray(jax_kernel(dense, m), np.float32).T for m in modules}  # (out, in), as Linear4bit holds W
    theirs = {m: dequantize_weight(layers[m]).detach().float().cpu().numpy() for m in modules}
    return compare_named_arrays(STAGE, name, ours, theirs, EXACT)


def check_quantization(pair: ModelPair) -> StageResult:
    """Holds the JAX NF4 kernels to ``lora_torch.quantize_base``'s and to transformers' 4-bit loading's layers."""
    if pair.quantize is None:
        return StageResult([failed(STAGE, "NF4 base", EXACT, "the pair holds no 4-bit base; load it with "
                                                             "quantize='nf4' (python -m parity --quantize nf4)")])
    jax_q = jax_nf4_kernels(pair.jax_params)
    rows = []
    for label, model in (("lora_torch.quantize_base", pair.torch_model),
                         ("transformers 4-bit loading", pair.reference_model)):
        layers = torch_4bit_layers(model)
        rows += [
            compare_exact(STAGE, f"quantized layers JAX vs {label}", set(jax_q), set(layers)),
            _table_row(f"NF4 codes (packed bytes) JAX vs {label}", jax_q, layers, ("codes",)),
            _table_row(f"absmax codes, nested absmax, offset JAX vs {label}", jax_q, layers,
                       ("absmax", "nested absmax", "offset")),
            _dequantized_row(f"dequantized kernels JAX vs {label} dequantize_4bit (worst layer)", pair, jax_q,
                             layers),
        ]
    return StageResult(rows + _probe_rows(pair))
