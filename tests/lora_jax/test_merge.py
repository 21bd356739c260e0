"""merge / unmerge with non-zero B: exact formula, forward equality, round trip, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.initialize import init_lora
from lora_jax.merge import lora_delta, merge, unmerge
from tests.lora_jax.encoder_model import Encoder, init_encoder, with_random_b

CONFIG = LoraConfig(rank=3, alpha=5.0, target_modules=["key", "ffn_in", "head"], use_rslora=True)


@pytest.fixture(scope="module")
def trees():
    params = init_encoder(Encoder())
    return params, with_random_b(init_lora(params, CONFIG, jax.random.key(2)), scale=0.5)


def test_merge_adds_scaled_product_to_each_targeted_kernel(trees):
    params, lora = trees
    merged = merge(params, lora)
    a, b = lora.weights["encoder"]["layers"]["1"]["ffn_in"]["lora_A"], lora.weights["encoder"]["layers"]["1"]["ffn_in"]["lora_B"]
    expected = np.asarray(params["encoder"]["layers"]["1"]["ffn_in"]["kernel"], np.float64) + (5.0 / np.sqrt(3)) * (
        np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    )
    # float64 reference; the fp32 result differs by float32 rounding of values of order 1 (< 1e-6).
    np.testing.assert_allclose(merged["encoder"]["layers"]["1"]["ffn_in"]["kernel"], expected, atol=1e-6, rtol=0)
    assert float(jnp.abs(merged["head"]["kernel"] - params["head"]["kernel"]).max()) > 1e-2  # B != 0 moved it
    # Untargeted leaves are the very same arrays.
    assert merged["encoder"]["layers"]["0"]["query"]["kernel"] is params["encoder"]["layers"]["0"]["query"]["kernel"]
    assert merged["head"]["bias"] is params["head"]["bias"]


def test_unmerge_restores_base_kernels(trees):
    params, lora = trees
    restored = unmerge(merge(params, lora), lora)
    for path in (("head",), ("encoder", "layers", "0", "key")):
        w0 = params
        w = restored
        for key in path:
            w0, w = w0[key], w[key]
        # Two fp32 roundings of |W0 + sAB| <= ~3: error below 2 * 2^-23 * 4, so 1e-6 holds.
        np.testing.assert_allclose(w["kernel"], w0["kernel"], atol=1e-6, rtol=0)


def test_merge_keeps_kernel_dtype():
    params = {"m": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}}
    weights = {"m": {"lora_A": jnp.ones((4, 1)), "lora_B": jnp.full((1, 4), 0.25)}}
    merged = merge(params, Adapter(weights, LoraConfig(rank=1, alpha=1.0, target_modules=["m"])))
    assert merged["m"]["kernel"].dtype == jnp.bfloat16
    assert float(merged["m"]["kernel"][0, 0]) == 1.25  # exactly representable in bf16


def test_lora_delta_matches_float64():
    a = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
    np.testing.assert_allclose(lora_delta(a, b, 0.5), 0.5 * (a.astype(np.float64) @ b), atol=1e-6, rtol=0)


def test_bad_trees_raise_before_anything_changes(trees):
    params, lora = trees
    with pytest.raises(ValueError, match="'decoder' has no kernel"):
        merge(params, Adapter({"decoder": lora.weights["head"]}, CONFIG))
    wrong = Adapter({"head": {"lora_A": lora.weights["head"]["lora_A"], "lora_B": jnp.zeros((3, 7))}}, CONFIG)
    with pytest.raises(ValueError, match=r"LoRA shapes for 'head'.*needs A \(16, 3\), B \(3, 5\)"):
        merge(params, wrong)
    with pytest.raises(ValueError, match="Did you pass the params tree"):
        merge(params, Adapter(params, CONFIG))
    with pytest.raises(TypeError, match="Adapter"):
        merge(params, lora.weights)


def test_merge_uses_the_scale_the_adapter_was_made_with(trees):
    # The old API took the config beside the tree, so merging with another alpha than the one
    # trained with went unnoticed. The adapter carries its config: the rank must fit the
    # weights, and the merged delta is exactly the trained scale times A @ B.
    params, lora = trees
    other_rank = Adapter(lora.weights, LoraConfig(rank=4, alpha=5.0, target_modules=CONFIG.target_modules))
    with pytest.raises(ValueError, match="says rank 4"):
        merge(params, other_rank)
    delta = np.asarray(merge(params, lora)["head"]["kernel"]) - np.asarray(params["head"]["kernel"])
    a, b = (np.asarray(lora.weights["head"][k], np.float64) for k in ("lora_A", "lora_B"))
    np.testing.assert_allclose(delta, lora.config.scaling * a @ b, atol=2e-6, rtol=0)  # fp32 rounding of |W| ~ 1
