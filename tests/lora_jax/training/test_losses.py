"""next_token_loss against a float64 reference, masks, and the one loss builder ``lm_loss``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.config import LoraConfig
from lora_jax.forward import lora_apply
from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
from lora_jax.initialize import init_lora
from lora_jax.training.chunked_loss import chunked_next_token_loss
from lora_jax.training.losses import Batch, lm_loss, next_token_loss
from tests.lora_jax.encoder_model import Encoder, init_encoder, random_ids, with_random_b

GPT = GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=1, n_head=2)
CONFIG = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn", "c_fc"])


def reference(logits, ids, mask):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    w = np.asarray(mask, np.float64)[:, 1:]
    return (nll * w).sum() / w.sum()


@pytest.fixture(scope="module")
def gpt2():
    """A 1-layer GPT-2, an adapter with non-zero B (so A's gradient is non-zero) and a (2, 6) batch."""
    params = init_gpt2_params(GPT, jax.random.key(0))
    adapter = with_random_b(init_lora(params, CONFIG, jax.random.key(1)))
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 17
    return GPT2(GPT), params, adapter, ids


# ---------------------------------------------------------------- the primitive


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


# ---------------------------------------------------------------- lm_loss


def test_gpt2_loss_fn_is_the_mean_nll_of_the_adapted_model(gpt2):
    model, params, adapter, ids = gpt2
    loss = jax.jit(lm_loss(model))(adapter, params, Batch(ids), None)
    # Fresh GPT-2 (std 0.02 weights) predicts nearly uniformly over 17 tokens: log 17 = 2.833 within 0.05.
    assert abs(float(loss) - np.log(17)) < 0.05
    # The same number as the primitive on the adapted model's logits: the builder only wires them.
    logits = jax.jit(lora_apply(model.apply))(params, adapter, ids)
    np.testing.assert_allclose(loss, reference(logits, ids, np.ones(ids.shape)), rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])  # 10 predictions: one per chunk, ragged chunks, one chunk
def test_chunked_head_equals_full_logits_in_value_and_adapter_gradient(gpt2, chunk_size):
    model, params, adapter, ids = gpt2
    batch = Batch(ids, jnp.ones(ids.shape).at[1, 4:].set(0.0))
    with jax.default_matmul_precision("highest"):
        ref, ref_grad = jax.jit(jax.value_and_grad(lm_loss(model)))(adapter, params, batch, None)
        got, grad = jax.jit(jax.value_and_grad(lm_loss(model, chunk_size=chunk_size)))(adapter, params, batch, None)
    # float32, "highest" precision: the chunked head only regroups the sums of an O(3) loss.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
    assert type(grad) is type(adapter) and grad.config is adapter.config  # the gradient of an Adapter is one
    leaves, ref_leaves = jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)
    assert len(leaves) == 4 and max(float(jnp.abs(g).max()) for g in leaves) > 1e-4  # not a vacuous match
    for g, r in zip(leaves, ref_leaves):
        # one block of float32 backprop on top of the regrouped head: a little more rounding
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_padding_mask_drops_the_padded_targets(gpt2):
    model, params, adapter, ids = gpt2
    mask = np.ones(ids.shape, np.float32)
    mask[1, 4:] = 0.0  # row 1 has 4 real tokens: 3 predictions count there, 5 in row 0
    loss_fn = jax.jit(lm_loss(model))
    loss = loss_fn(adapter, params, Batch(ids, jnp.asarray(mask)), None)
    logits = jax.jit(lora_apply(model.apply))(params, adapter, ids)
    np.testing.assert_allclose(loss, reference(logits, ids, mask), rtol=1e-6)
    # Right padding: what the padded slots hold reaches no counted prediction, so the loss is bit-identical.
    other = ids.at[1, 4:].set(3)
    assert float(loss_fn(adapter, params, Batch(other, jnp.asarray(mask)), None)) == float(loss)
    # ...and the mask does change the value (the padded targets would have counted).
    assert abs(float(loss_fn(adapter, params, Batch(ids), None)) - float(loss)) > 1e-4


def test_adapter_none_is_the_base_models_loss(gpt2):
    model, params, adapter, ids = gpt2
    base = jax.jit(lambda p, b: lm_loss(model)(None, p, b, None))(params, Batch(ids))
    expected = jax.jit(lambda p: next_token_loss(model.apply({"params": p}, ids), ids))(params)
    assert float(base) == float(expected)  # the same program: no LoRA branch at all
    # A fresh adapter (B = 0) adds exact zeros; under jit XLA may fuse the two programs differently (an ulp).
    fresh = init_lora(params, CONFIG, jax.random.key(2))
    np.testing.assert_allclose(jax.jit(lm_loss(model))(fresh, params, Batch(ids), None), base, rtol=1e-6)


def test_any_flax_language_model_works_unchunked():
    model = Encoder(n_out=13)  # ids -> (B, T, 13) scores over its 13-token vocabulary: a language model
    params = init_encoder(model)
    adapter = with_random_b(init_lora(params, LoraConfig(rank=2, target_modules=["query", "head"]), jax.random.key(1)))
    ids = random_ids(3, batch=2, length=6)
    loss = jax.jit(lm_loss(model))(adapter, params, Batch(ids), None)
    logits = jax.jit(lora_apply(model.apply))(params, adapter, ids)
    np.testing.assert_allclose(loss, reference(logits, ids, np.ones(ids.shape)), rtol=1e-6)


def test_a_dict_batch_is_refused_with_the_fix(gpt2):
    model, params, adapter, ids = gpt2
    for loss_fn in (lm_loss(model), lm_loss(model, chunk_size=4)):
        with pytest.raises(TypeError, match=r"lora_jax\.Batch\(input_ids, mask=None\), got dict; wrap it as lora_jax\.Batch\(\*\*batch\)"):
            loss_fn(adapter, params, {"input_ids": ids}, None)
        with pytest.raises(TypeError, match=r"got tuple; wrap it as lora_jax\.Batch\(input_ids, mask\)"):
            loss_fn(adapter, params, (ids, None), None)  # an (inputs, targets)-style tuple
    with pytest.raises(ValueError, match=r"Batch.input_ids must be \(B, T\) token ids, got shape \(6,\)"):
        lm_loss(model)(adapter, params, Batch(ids[0]), None)


def test_a_bare_lora_tree_is_refused_with_the_fix(gpt2):
    model, params, adapter, ids = gpt2
    with pytest.raises(TypeError, match=r"got dict.*lora_jax\.Adapter\(weights, config\)"):
        lm_loss(model)(adapter.weights, params, Batch(ids), None)


def test_chunk_size_needs_a_gpt2_and_a_model_needs_apply():
    with pytest.raises(TypeError, match=r"lm_loss\(chunk_size=...\) needs a model with a tied LM head .* got Encoder; "
                                        r"use chunk_size=None"):
        lm_loss(Encoder(), chunk_size=4)
    with pytest.raises(TypeError, match=r"lm_loss needs a Flax module with .apply .* got object"):
        lm_loss(object())
