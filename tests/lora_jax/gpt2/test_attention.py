"""causal_attention against jax.nn.dot_product_attention: the value and all three gradients.

The reference is JAX's own attention with autodiff through it; ours has a hand-written backward pass
whose softmax row sums come from rowsum(dy * y) rather than rowsum(dp * p). The two agree up to
float32 rounding of sums over T = 16 and hs = 8 terms: 2e-6 absolute on values of order 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.gpt2.attention import causal_attention

B, T, NH, HS = 2, 16, 3, 8


def reference(qkv: jax.Array, scale: float) -> jax.Array:
    q, k, v = (a.reshape(B, T, NH, HS) for a in jnp.split(qkv, 3, axis=-1))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True).reshape(B, T, NH * HS)


@pytest.fixture(scope="module")
def data():
    qkv = jax.random.normal(jax.random.key(0), (B, T, 3 * NH * HS))
    cotangent = jax.random.normal(jax.random.key(1), (B, T, NH * HS))
    return qkv, cotangent


@pytest.mark.parametrize("scale", [HS**-0.5, 0.17])
def test_value_and_gradient_match_jax_attention(data, scale):
    qkv, cotangent = data
    ours, ours_vjp = jax.vjp(lambda x: causal_attention(x, NH, scale), qkv)
    ref, ref_vjp = jax.vjp(lambda x: reference(x, scale), qkv)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    (ours_grad,), (ref_grad,) = ours_vjp(cotangent), ref_vjp(cotangent)
    np.testing.assert_allclose(ours_grad, ref_grad, atol=2e-6)
    assert float(jnp.max(jnp.abs(ref_grad))) > 0.1  # the check compares real gradients, not zeros


def test_is_causal(data):
    # Changing the last position's q, k and v changes no earlier output, and no gradient flows back to it
    # from an earlier output.
    qkv, _ = data
    changed = qkv.at[:, -1].add(1.0)
    y, y_changed = causal_attention(qkv, NH, 0.3), causal_attention(changed, NH, 0.3)
    np.testing.assert_array_equal(y[:, :-1], y_changed[:, :-1])
    assert float(jnp.max(jnp.abs(y[:, -1] - y_changed[:, -1]))) > 1e-3
    grad = jax.grad(lambda x: jnp.sum(causal_attention(x, NH, 0.3)[:, :-1]))(qkv)
    np.testing.assert_array_equal(grad[:, -1], 0.0)


def test_bfloat16_keeps_the_dtype_and_stays_close(data):
    # bf16 inputs: float32 scores and softmax inside, bf16 out. bf16 has 8 mantissa bits, so 3e-2 absolute.
    qkv, cotangent = data
    low = qkv.astype(jnp.bfloat16)
    ours, vjp = jax.vjp(lambda x: causal_attention(x, NH, 0.3), low)
    (grad,) = vjp(cotangent.astype(jnp.bfloat16))
    assert ours.dtype == grad.dtype == jnp.bfloat16
    ref, ref_vjp = jax.vjp(lambda x: reference(x, 0.3), qkv)
    np.testing.assert_allclose(ours.astype(jnp.float32), ref, atol=3e-2)
    np.testing.assert_allclose(grad.astype(jnp.float32), ref_vjp(cotangent)[0], atol=3e-2)
