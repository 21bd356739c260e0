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
