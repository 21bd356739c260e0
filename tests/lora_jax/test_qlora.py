"""A QLoRA base in lora_jax against transformers' 4-bit GPT-2 (bitsandbytes 0.50, CPU, fp32 compute).

The codes and statistics of every quantized layer must equal bitsandbytes' byte for byte; the base
logits then differ only by summation order (dequantized kernels are bit-identical, see test_nf4.py):
measured 1e-6 on logits of order 1, checked at 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import lora_jax
from lora_jax.lora_tree import get_module
from lora_jax.nf4 import NF4Tensor
from peft_compare import IDS, flax_gpt2, jax_logits, max_error, torch_logits

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return flax_gpt2(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def torch_4bit(tiny_gpt2_dir):
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, quantization_config=config, device_map="cpu").eval()


@pytest.fixture(scope="module")
def quantized(gpt2):
    return lora_jax.quantize_params(gpt2[1])


def test_every_quantized_layer_has_bitsandbytes_codes_and_statistics(quantized, torch_4bit):
    layers = {name: m for name, m in torch_4bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks; the tied head stays dense
    for name, layer in layers.items():
        ours = get_module(quantized, tuple(name.split(".")))["kernel"]
        state = layer.weight.quant_state
        assert isinstance(ours, NF4Tensor) and ours.shape == tuple(state.shape)  # (out, in), as Linear4bit holds it
        np.testing.assert_array_equal(np.asarray(ours.codes), layer.weight.data.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(ours.nested_absmax), state.state2.absmax.numpy())
        assert float(ours.offset) == float(state.offset)
    assert get_module(quantized, ("transformer", "wte"))["embedding"].dtype == jnp.float32


def test_base_logits_equal_transformers_4bit(gpt2, quantized, torch_4bit):
    ours = jax_logits(gpt2, None, IDS, params=quantized)
    assert max_error(ours, jax_logits(gpt2, None, IDS)) > 1e-3  # quantization changed the model
    np.testing.assert_allclose(ours, torch_logits(torch_4bit), atol=1e-5, rtol=0)


def test_qlora_training_keeps_the_base_nf4_and_learns(gpt2, quantized):
    model, params = gpt2
    config = lora_jax.LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc"])
    adapter = lora_jax.init_lora(params, config, jax.random.key(0))
    tx = optax.adam(1e-2)
    step = lora_jax.make_train_step(lora_jax.lm_loss(model), tx, donate=False)
    batch = lora_jax.Batch(jnp.asarray(IDS))
    state, losses = tx.init(adapter), []
    for _ in range(8):
        adapter, state, metrics = step(adapter, state, quantized, batch, None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(quantized, is_leaf=lambda x: isinstance(x, NF4Tensor))
               if isinstance(leaf, NF4Tensor)]
    assert len(kernels) == 8 and all(k.codes.dtype == jnp.uint8 for k in kernels)
    merged = lora_jax.merge(lora_jax.dequantize_params(quantized), adapter)  # QLoRA merge: dequantize, add s A B
    np.testing.assert_allclose(jax_logits(gpt2, None, IDS, params=merged),
                               jax_logits(gpt2, adapter, IDS, params=quantized), atol=1e-4, rtol=0)


def test_quantizing_twice_or_nothing_is_refused(quantized):
    with pytest.raises(ValueError, match="already quantized"):
        lora_jax.quantize_params(quantized)
    with pytest.raises(ValueError, match="no 2-D 'kernel'"):
        lora_jax.quantize_params({"ln": {"scale": jnp.ones(4)}})


def _trained_adapter(params, use_dora=False):
    """A non-identity adapter (B random, PEFT's init_lora_weights=False) so a merge moves the kernels."""
    config = lora_jax.LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                                 use_dora=use_dora)
    return lora_jax.init_lora(params, config, jax.random.key(3))


def test_init_lora_and_counts_accept_an_nf4_base_directly(gpt2, quantized):
    params = gpt2[1]
    for use_dora in (False, True):
        config = lora_jax.LoraConfig(rank=4, target_modules=["c_attn", "c_fc"], use_dora=use_dora)
        from_nf4 = lora_jax.init_lora(quantized, config, jax.random.key(0))
        # the factors depend on shapes and the key only; DoRA's magnitudes on the (dequantized) kernels
        expected = lora_jax.init_lora(lora_jax.dequantize_params(quantized), config, jax.random.key(0))
        for a, b in zip(jax.tree_util.tree_leaves(from_nf4), jax.tree_util.tree_leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
        assert lora_jax.lora_param_count(quantized, config) == lora_jax.lora_param_count(params, config)
    assert lora_jax.count_params(quantized) == lora_jax.count_params(params)  # values, not bytes of codes


def test_merge_of_an_nf4_base_is_the_merge_of_its_dequantized_kernels(gpt2, quantized):
    adapter = _trained_adapter(gpt2[1])
    merged = lora_jax.merge(quantized, adapter)
    expected = lora_jax.merge(lora_jax.dequantize_params(quantized), adapter)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)  # the same float computation: bit for bit
    # the merged float model computes the QLoRA forward: fp32, x(W0 + sAB) vs xW0 + s(xA)B, ~1e-6 on logits ~1
    np.testing.assert_allclose(jax_logits(gpt2, None, IDS, params=merged),
                               jax_logits(gpt2, adapter, IDS, params=quantized), atol=1e-5, rtol=0)


def test_requantized_merge_is_nf4_with_the_base_settings_and_a_measured_loss(gpt2):
    params = gpt2[1]
    base = lora_jax.quantize_params(params, block_size=128, double_quant=False)
    adapter = _trained_adapter(params)
    merged = lora_jax.merge(base, adapter)
    again = lora_jax.merge(base, adapter, requantize=True)
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(again, is_leaf=lambda x: isinstance(x, NF4Tensor))
               if isinstance(leaf, NF4Tensor)]
    assert len(kernels) == 8 and {(k.block_size, k.double_quant) for k in kernels} == {(128, False)}
    error = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(lora_jax.dequantize_params(again)),
                                                         jax.tree_util.tree_leaves(merged)))
    # NF4's largest gap is 0.28 of a block's absmax (between 0.72 and 1.0): half of it bounds the rounding
    absmax = max(float(jnp.abs(k).max()) for k in jax.tree_util.tree_leaves(merged))
    assert 0 < error <= 0.14 * absmax
    with pytest.raises(ValueError, match=r"requantize=True\) re-quantizes the NF4 kernels of a QLoRA base"):
        lora_jax.merge(params, adapter, requantize=True)
