"""load_gpt2(..., quantize="nf4"): a float checkpoint quantized at load, and a checkpoint transformers saved from
its 4-bit model read as stored, both giving the NF4Tensors of quantize_params byte for byte; tampered 4-bit
checkpoints are refused with an error naming the tensor and what disagrees."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax.nf4 import NF4Tensor

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

C_ATTN = "transformer.h.0.attn.c_attn.weight"  # (96, 32) as Linear4bit holds it: 3,072 values, 48 blocks


def _is_nf4(leaf) -> bool:
    return isinstance(leaf, NF4Tensor)


@pytest.fixture(scope="module")
def saved_4bit(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 loaded by transformers in 4 bits (NF4, double quant) and saved with save_pretrained."""
    import torch
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, quantization_config=config, device_map="cpu")
    out = tmp_path_factory.mktemp("tiny_4bit")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tensors_4bit(saved_4bit):
    from safetensors.numpy import load_file

    return load_file(saved_4bit / "model.safetensors")


def _assert_same_tree(ours, expected) -> int:
    """Every leaf equal; NF4Tensors equal in codes, statistics and static fields. Returns the NF4 count."""
    left = jax.tree_util.tree_leaves_with_path(ours, is_leaf=_is_nf4)
    right = jax.tree_util.tree_leaves_with_path(expected, is_leaf=_is_nf4)
    assert [path for path, _ in left] == [path for path, _ in right]
    count = 0
    for (path, a), (_, b) in zip(left, right):
        assert _is_nf4(a) == _is_nf4(b), path
        if _is_nf4(a):
            count += 1
            assert (a.shape, a.dtype, a.block_size) == (b.shape, b.dtype, b.block_size), path
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
                assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path
        else:
            np.testing.assert_array_equal(a, b)
    return count


def test_quantize_nf4_at_load_equals_quantize_params(tiny_gpt2_dir):
    config, params = lora_jax.load_gpt2(tiny_gpt2_dir)
    _, quantized = lora_jax.load_gpt2(tiny_gpt2_dir, quantize="nf4")
    assert _assert_same_tree(quantized, lora_jax.quantize_params(params)) == 4 * config.n_layer
    _, single = lora_jax.load_gpt2(tiny_gpt2_dir, quantize="nf4", block_size=128, double_quant=False)
    kernel = single["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert (kernel.block_size, kernel.double_quant, kernel.absmax.shape) == (128, False, (24,))  # 3,072 / 128


def test_a_saved_4bit_checkpoint_loads_as_stored(tiny_gpt2_dir, saved_4bit):
    _, params = lora_jax.load_gpt2(tiny_gpt2_dir)
    _, loaded = lora_jax.load_gpt2(saved_4bit, quantize="nf4")
    assert _assert_same_tree(loaded, lora_jax.quantize_params(params)) == 8  # all 8 Linear4bit layers


@pytest.mark.parametrize("kwargs, match", [
    ({"quantize": "fp4"}, r"quantize='fp4' is not supported; use None \(float weights\) or 'nf4'"),
    ({"quantize": "nf4", "block_size": 100}, r"block_size=100 is not one bitsandbytes accepts"),
])
def test_bad_quantize_arguments_are_refused(tiny_gpt2_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_jax.load_gpt2(tiny_gpt2_dir, **kwargs)


def test_a_4bit_checkpoint_needs_quantize_and_its_own_settings(saved_4bit):
    with pytest.raises(ValueError, match="holds a 4-bit .* load it with quantize='nf4'"):
        lora_jax.load_gpt2(saved_4bit)
    with pytest.raises(ValueError, match="with block_size=64, double_quant=True, but load_gpt2 was asked for "
                                         "block_size=128, double_quant=True"):
        lora_jax.load_gpt2(saved_4bit, quantize="nf4", block_size=128)


def _state(tensors, name=C_ATTN) -> dict:
    return json.loads(tensors[f"{name}.quant_state.bitsandbytes__nf4"].tobytes())


def _with_state(tensors, **changes) -> dict:
    state = {**_state(tensors), **changes}
    return {f"{C_ATTN}.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(state).encode(), np.uint8).copy()}


TAMPERED = {
    "absmax truncated": (lambda t: {f"{C_ATTN}.absmax": t[f"{C_ATTN}.absmax"][:-1]},
                         r"c_attn.weight: absmax has shape \(47,\), expected \(48,\) \(one per block of 64 of 3072"),
    "codes too short": (lambda t: {C_ATTN: t[C_ATTN][:-2]},
                        r"c_attn.weight: codes have shape \(1534, 1\), expected \(1536, 1\)"),
    "codes not uint8": (lambda t: {C_ATTN: t[C_ATTN].astype(np.float32)},
                        r"c_attn.weight: codes are float32, expected uint8"),
    "quant map not NF4": (lambda t: {f"{C_ATTN}.quant_map": t[f"{C_ATTN}.quant_map"][::-1].copy()},
                          r"c_attn.weight: quant_map differs from the NF4 table"),
    "nested map changed": (lambda t: {f"{C_ATTN}.nested_quant_map": t[f"{C_ATTN}.nested_quant_map"] * 2},
                           r"nested_quant_map differs from bitsandbytes' 8-bit dynamic map"),
    "nested absmax extra": (lambda t: {f"{C_ATTN}.nested_absmax": np.ones(2, np.float32)},
                            r"nested_absmax has shape \(2,\), expected \(1,\) \(one per 256 of the 48 blocks\)"),
    "shape in JSON": (lambda t: _with_state(t, shape=[96, 16]),
                      r"codes have shape \(1536, 1\), expected \(768, 1\)"),
    "dtype in JSON": (lambda t: _with_state(t, dtype="int8"), r"dtype 'int8' is not one of"),
    "fp4": (lambda t: _with_state(t, quant_type="fp4"), r"quant_type is 'fp4'; lora_jax reads NF4 only"),
    "part missing": (lambda t: {f"{C_ATTN}.quant_map": None}, rf"missing {C_ATTN}.quant_map"),
    "orphan statistic": (lambda t: {f"{C_ATTN}.quant_state.bitsandbytes__nf4": None},
                         r"c_attn.weight.absmax: a 4-bit statistic without its"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_4bit_checkpoint_is_refused(saved_4bit, tensors_4bit, tmp_path, case):
    from safetensors.numpy import save_file

    change, match = TAMPERED[case]
    tensors = {**tensors_4bit, **change(tensors_4bit)}
    tensors = {key: value for key, value in tensors.items() if value is not None}
    shutil.copy(saved_4bit / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not fit together: .*" + match):
        lora_jax.load_gpt2(tmp_path, quantize="nf4")


def test_every_problem_is_named_in_one_error(saved_4bit, tensors_4bit, tmp_path):
    from safetensors.numpy import save_file

    other = "transformer.h.1.mlp.c_fc.weight"
    tensors = {**tensors_4bit, f"{C_ATTN}.absmax": tensors_4bit[f"{C_ATTN}.absmax"][:-1],
               other: tensors_4bit[other][:-1]}
    shutil.copy(saved_4bit / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        lora_jax.load_gpt2(tmp_path, quantize="nf4")
    assert f"{C_ATTN}: absmax" in str(err.value) and f"{other}: codes have shape" in str(err.value)
