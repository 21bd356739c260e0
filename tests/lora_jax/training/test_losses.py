"""next_token_loss against a float64 reference, masks, and the GPT-2 loss_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.training.chunked_loss import chunked_next_token_loss
from lora_jax.config import LoraConfig
from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
from lora_jax.initialize import init_lora
from lora_jax.training.losses import causal_lm_loss, gpt2_lm_loss, next_token_loss


def reference(logits, ids, mask):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    w = np.asarray(mask, np.float64)[:, 1:]
    return (nll * w).sum() / w.sum()


def test_matches_float64_reference_with_and_without_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(3, 7))
    mask = np.ones((3, 7))
    mask[1, 4:] = 0
    # fp32 log-softmax over 11 values of order 1: relative error ~1e-7, so rtol 1e-6.
    np.testing.assert_allclose(next_token_loss(jnp.asarray(logits), jnp.asarray(ids)), reference(logits, ids, np.ones((3, 7))), rtol=1e-6)
    np.testing.assert_allclose(next_token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask)), reference(logits, ids, mask), rtol=1e-6)


def test_agrees_with_chunked_loss_on_the_same_mask_rule():
    rng = np.random.default_rng(1)
    hidden, embedding = rng.normal(size=(2, 5, 4)).astype(np.float32), rng.normal(size=(9, 4)).astype(np.float32)
    ids, mask = rng.integers(0, 9, size=(2, 5)), (rng.random((2, 5)) > 0.3).astype(np.float32)
    logits = jnp.asarray(hidden @ embedding.T)
    chunked = chunked_next_token_loss(jnp.asarray(hidden), jnp.asarray(embedding), jnp.asarray(ids), jnp.asarray(mask), chunk_size=4)
    # Same math, different summation order and matmul grouping: fp32 rounding only.
    np.testing.assert_allclose(next_token_loss(logits, jnp.asarray(ids), jnp.asarray(mask)), chunked, rtol=1e-5)


def test_all_padding_gives_zero_and_bf16_logits_give_fp32():
    logits = jnp.zeros((1, 4, 3), jnp.bfloat16)
    assert float(next_token_loss(logits, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4)))) == 0.0
    assert next_token_loss(logits, jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32


def test_shape_errors():
    with pytest.raises(ValueError, match="logits must be"):
        next_token_loss(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="mask must have the shape"):
        next_token_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3)))


def test_gpt2_loss_fn_is_the_mean_nll_of_the_adapted_model():
    gpt = GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = init_gpt2_params(gpt, jax.random.key(0))
    config = LoraConfig(rank=2, target_modules=["c_fc"])
    lora = init_lora(params, config, jax.random.key(1))
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 17
    loss = jax.jit(gpt2_lm_loss(GPT2(gpt), config))(lora, params, {"input_ids": ids}, None)
    # Fresh GPT-2 (std 0.02 weights) predicts nearly uniformly over 17 tokens: log 17 = 2.833 within 0.05.
    assert abs(float(loss) - np.log(17)) < 0.05
    with pytest.raises(TypeError, match="batch must be a dict with 'input_ids'"):
        jax.eval_shape(causal_lm_loss(GPT2(gpt).apply, config), lora, params, ids, None)
    with pytest.raises(TypeError, match="use causal_lm_loss"):
        gpt2_lm_loss(object(), config)
