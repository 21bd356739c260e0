"""The chunked, gradient-fused cross-entropy equals the plain full-logits one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.training.chunked_loss import chunked_cross_entropy, chunked_next_token_loss

# float32 on CPU with "highest" matmul precision: the chunked sums reorder additions, so agreement
# is at float32 rounding of O(1) values summed over a few dozen terms.
ATOL = 2e-6
RTOL = 1e-5

B, T, D, V = 2, 7, 16, 97  # B*T = 14 is not a multiple of the chunk sizes used: padding is exercised


def _inputs(seed: int = 0):
    k_h, k_e, k_t, k_w = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k_h, (B, T, D))
    embedding = 0.5 * jax.random.normal(k_e, (V, D))
    targets = jax.random.randint(k_t, (B, T), 0, V)
    weights = (jax.random.uniform(k_w, (B, T)) > 0.3).astype(jnp.float32)
    return hidden, embedding, targets, weights


def _reference(hidden, embedding, targets, weights):
    logits = jnp.einsum("btd,vd->btv", hidden, embedding)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(weights * nll) / jnp.sum(weights)


@pytest.mark.parametrize("chunk_size", [3, 14, 64])
def test_loss_and_gradients_match_full_logits(chunk_size):
    hidden, embedding, targets, weights = _inputs()
    with jax.default_matmul_precision("highest"):
        ref, (ref_dh, ref_de) = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, embedding, targets, weights)
        got, (dh, de) = jax.value_and_grad(
            lambda h, e: chunked_cross_entropy(h, e, targets, weights, chunk_size=chunk_size, embedding_grad=True),
            argnums=(0, 1))(hidden, embedding)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dh, ref_dh, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(de, ref_de, rtol=RTOL, atol=ATOL)


def test_frozen_embedding_gets_zero_gradient_and_same_hidden_gradient():
    hidden, embedding, targets, weights = _inputs(1)
    with jax.default_matmul_precision("highest"):
        ref_dh = jax.grad(_reference)(hidden, embedding, targets, weights)
        dh, de = jax.grad(lambda h, e: chunked_cross_entropy(h, e, targets, weights, chunk_size=4), argnums=(0, 1))(
            hidden, embedding)
    np.testing.assert_allclose(dh, ref_dh, rtol=RTOL, atol=ATOL)
    assert float(jnp.max(jnp.abs(de))) == 0.0


def test_undifferentiated_call_matches_reference():
    hidden, embedding, targets, weights = _inputs(2)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda h, e: chunked_cross_entropy(h, e, targets, weights, chunk_size=3))(hidden, embedding)
        ref = _reference(hidden, embedding, targets, weights)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_next_token_loss_shifts_targets_and_drops_last_position():
    hidden, embedding, ids, _ = _inputs(3)
    mask = jnp.ones((B, T)).at[1, 5:].set(0.0)  # second row has 5 real tokens
    with jax.default_matmul_precision("highest"):
        got = chunked_next_token_loss(hidden, embedding, ids, mask, chunk_size=4)
        ref = _reference(hidden[:, :-1], embedding, ids[:, 1:], mask[:, 1:])
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_no_intermediate_holds_all_logits():
    b, t, d, v, chunk = 4, 32, 8, 1000, 16
    hidden = jnp.ones((b, t, d))
    embedding = jnp.ones((v, d))
    ids = jnp.zeros((b, t), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda h: chunked_next_token_loss(h, embedding, ids, chunk_size=chunk)))(hidden)

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for param in eqn.params.values():  # the scan body is a nested (closed) jaxpr
                sub = getattr(param, "jaxpr", None)
                if sub is not None and hasattr(sub, "eqns"):
                    yield from sizes(sub)

    # The biggest array is one chunk's logits, 1/8 of the full (b*t, v) block.
    assert max(sizes(jaxpr.jaxpr)) == chunk * v


def test_all_zero_weights_give_zero_loss():
    hidden, embedding, targets, _ = _inputs(4)
    assert float(chunked_cross_entropy(hidden, embedding, targets, jnp.zeros((B, T)))) == 0.0


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(targets=jnp.zeros((B, T + 1), jnp.int32)), ValueError, "targets must have shape"),
        (dict(targets=jnp.zeros((B, T))), TypeError, "integer"),
        (dict(embedding=jnp.zeros((V, D + 1))), ValueError, "tied wte"),
        (dict(weights=jnp.ones((B,))), ValueError, "weights"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, fragment):
    hidden, embedding, targets, _ = _inputs()
    args = dict(hidden=hidden, embedding=embedding, targets=targets, weights=None)
    args.update(kwargs)
    chunk_size = args.pop("chunk_size", 4)
    with pytest.raises(error, match=fragment):
        chunked_cross_entropy(**args, chunk_size=chunk_size)


def test_gpt2_chunked_loss_matches_full_logits_loss_and_lora_gradient(tiny_gpt2_dir):
    from lora_jax import Batch, LoraConfig, init_lora, lm_loss
    from lora_jax.gpt2.loading import load_gpt2
    from lora_jax.gpt2.model import GPT2

    gpt_config, params = load_gpt2(tiny_gpt2_dir)
    config = LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn", "c_proj", "c_fc"])
    adapter = init_lora(params, config, jax.random.key(0))
    # Non-zero B, so the gradient of A is non-zero too.
    adapter = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape) if "lora_B" in str(p[-1]) else x,
        adapter)
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, gpt_config.vocab_size)
    batch = Batch(ids, jnp.ones((2, 9)).at[0, 7:].set(0.0))
    model = GPT2(gpt_config)
    with jax.default_matmul_precision("highest"):
        ref, ref_grad = jax.jit(jax.value_and_grad(lm_loss(model)))(adapter, params, batch, None)
        got, grad = jax.jit(jax.value_and_grad(lm_loss(model, chunk_size=5)))(adapter, params, batch, None)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        # gradients pass through 2 layers of float32 backprop: a little more rounding than the head alone
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grad.weights["transformer"]["h"]["0"]["attn"]["c_attn"]["lora_A"]).max()) > 0.0


def test_gpt2_chunked_loss_rejects_a_dict_batch():
    from lora_jax import lm_loss
    from lora_jax.gpt2.model import GPT2, GPT2Config

    loss_fn = lm_loss(GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)), chunk_size=4)
    with pytest.raises(TypeError, match=r"batch must be a lora_jax\.Batch.*got dict; wrap it as lora_jax\.Batch\(\*\*batch\)"):
        loss_fn(None, {}, {"input_ids": jnp.zeros((1, 3), jnp.int32)}, None)
