"""The QLoRA step keeps the base NF4 in memory and dequantizes each kernel where it is used.

Numbers come from XLA's memory analysis of the compiled step (``jit(step).lower(...).compile()``), on
abstract inputs, so nothing is allocated: a 2-layer, width-256 GPT-2 (1.6M kernel parameters) at batch 2 x 64.
Measured on GPT-2 small (docs/qlora.md): kernels 0.516 bytes/param as step inputs; temporaries 583 MB against
578 MB for the fp32 LoRA step, where dequantizing the whole tree up front kept all kernels alive (911 MB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax.gpt2.model import GPT2Config
from lora_jax.nf4 import NESTED_BLOCK_SIZE, NF4Tensor

CONFIG = GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=2, n_head=4)
LORA = lora_jax.LoraConfig(rank=8, alpha=16, target_modules=["c_attn", "c_proj"])
BATCH = lora_jax.Batch(jax.ShapeDtypeStruct((2, 64), jnp.int32))


def _abstract_nf4(shape: tuple[int, int], block_size: int = 64) -> NF4Tensor:
    n = shape[0] * shape[1]
    blocks = -(n // -block_size)
    s = jax.ShapeDtypeStruct
    return NF4Tensor(s((-(n // -2),), jnp.uint8), s((blocks,), jnp.uint8),
                     s((-(blocks // -NESTED_BLOCK_SIZE),), jnp.float32), s((), jnp.float32), shape,
                     np.dtype(np.float32), block_size)


def _quantized_shapes(tree):
    return {key: _abstract_nf4(value.shape[::-1]) if key == "kernel" else
            _quantized_shapes(value) if isinstance(value, dict) else value for key, value in tree.items()}


def _nbytes(tree) -> int:
    return sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def analyses():
    """``{(quantized, remat): memory_analysis}`` of the train step, plus the float params' shapes."""
    params = jax.eval_shape(lambda: lora_jax.init_gpt2_params(CONFIG, jax.random.key(0)))
    adapter = jax.eval_shape(lambda: lora_jax.init_lora(params, LORA, jax.random.key(1)))
    tx = optax.adamw(1e-4)
    opt_state = jax.eval_shape(tx.init, adapter)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    out = {}
    for quantized, remat in ((False, False), (True, False), (True, True)):
        step = lora_jax.make_train_step(lora_jax.lm_loss(lora_jax.GPT2(CONFIG, remat=remat), chunk_size=64), tx)
        frozen = _quantized_shapes(params) if quantized else params
        out[quantized, remat] = step.lower(adapter, opt_state, frozen, BATCH, rng).compile().memory_analysis()
    return out, params, adapter


def test_the_quantized_kernels_are_step_inputs_at_under_0_6_bytes_per_param(analyses):
    memory, params, _ = analyses
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
    n = sum(k.size for k in kernels)
    assert n == 2 * 12 * 256 * 256
    # The two steps take the same inputs except the kernels: fp32 (4 bytes/param) against NF4 codes + statistics.
    kernel_bytes = memory[True, False].argument_size_in_bytes - (memory[False, False].argument_size_in_bytes - 4 * n)
    assert kernel_bytes / n < 0.6  # measured 0.51589: 0.5 codes + 1/64 absmax codes + nested absmax and offsets
    assert kernel_bytes == _nbytes(_quantized_shapes(params)) - _nbytes(params) + 4 * n  # exactly the NF4 leaves


def test_dequantized_kernels_are_temporaries_of_one_layer_at_a_time(analyses):
    memory, params, _ = analyses
    layer = 12 * 256 * 256 * 4  # one block's four kernels in fp32: 3.1 MB; both layers: 6.3 MB
    for remat in (False, True):
        extra = memory[True, remat].temp_size_in_bytes - memory[False, False].temp_size_in_bytes
        # Each dequantized kernel lives from just before its matmul to just after; a kernel kept from the forward
        # pass for the backward one (as when the whole tree was dequantized at the top) would add both layers.
        assert extra < layer, (remat, extra)


def test_the_step_outputs_only_the_adapter_and_its_optimizer_state(analyses):
    memory, _, adapter = analyses
    # adapter + AdamW's two moments + count + the loss and grad norm, and XLA's 8-byte pointer per output
    # leaf (measured: exactly that): no gradient or copy of the base comes out.
    leaves = 3 * len(jax.tree_util.tree_leaves(adapter)) + 3
    assert memory[True, False].output_size_in_bytes <= 3 * _nbytes(adapter) + 4 + 2 * 4 + 8 * leaves


@pytest.fixture(scope="module")
def small_real():
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    params = lora_jax.init_gpt2_params(config, jax.random.key(0))
    lora = lora_jax.LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    adapter = lora_jax.init_lora(params, lora, jax.random.key(1))
    batch = lora_jax.Batch(jax.random.randint(jax.random.key(2), (2, 16), 0, 97))
    return config, params, adapter, batch


def test_gradients_reach_only_the_adapter_and_match_the_dequantized_model(small_real):
    config, params, adapter, batch = small_real
    frozen = lora_jax.quantize_params(params)
    dense = lora_jax.dequantize_params(frozen)
    loss_fn = lora_jax.lm_loss(lora_jax.GPT2(config))
    loss_q, grads = jax.jit(jax.value_and_grad(loss_fn))(adapter, frozen, batch, None)
    loss_d, grads_d = jax.jit(jax.value_and_grad(loss_fn))(adapter, dense, batch, None)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
    # Same kernels, fp32; only the contraction's layout differs (W (out, in) against W.T): ~1 ulp of the loss.
    assert abs(float(loss_q) - float(loss_d)) < 1e-6
    for g, g_d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_d)):
        np.testing.assert_allclose(g, g_d, rtol=1e-5, atol=1e-7)
    frozen_grads = jax.jit(jax.grad(loss_fn, argnums=1, allow_int=True))(adapter, frozen, batch, None)
    kernel = frozen_grads["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert kernel.codes.dtype == jax.dtypes.float0 and float(jnp.abs(kernel.offset)) == 0.0  # the base: no gradient


def test_remat_trains_the_same_adapter(small_real):
    config, params, adapter, batch = small_real
    frozen = lora_jax.quantize_params(params)
    tx = optax.adam(1e-2)
    results = []
    for remat in (False, True):
        step = lora_jax.make_train_step(lora_jax.lm_loss(lora_jax.GPT2(config, remat=remat)), tx, donate=False)
        a, state, losses = adapter, tx.init(adapter), []
        for _ in range(3):
            a, state, metrics = step(a, state, frozen, batch, None)
            losses.append(float(metrics["loss"]))
        results.append((losses, a))
    assert results[0][0][-1] < results[0][0][0]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)  # recomputation repeats the same ops
    for x, y in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
