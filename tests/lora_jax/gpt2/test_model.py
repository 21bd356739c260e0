"""The Flax GPT-2: parameter tree, config validation, remat, cache and dtypes."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.gpt2.model import (
    GPT2,
    GPT2Config,
    gpt2_medium,
    gpt2_small,
    gpt2_xl,
    init_cache,
    init_gpt2_params,
)

CFG = GPT2Config(vocab_size=37, n_positions=16, n_embd=24, n_layer=2, n_head=3)


@pytest.fixture(scope="module")
def params():
    return init_gpt2_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def test_parameter_tree_matches_the_architecture_contract(params):
    d, v, p = CFG.n_embd, CFG.vocab_size, CFG.n_positions
    layer = {
        "ln_1": {"scale": (d,), "bias": (d,)},
        "attn": {"c_attn": {"kernel": (d, 3 * d), "bias": (3 * d,)}, "c_proj": {"kernel": (d, d), "bias": (d,)}},
        "ln_2": {"scale": (d,), "bias": (d,)},
        "mlp": {"c_fc": {"kernel": (d, 4 * d), "bias": (4 * d,)}, "c_proj": {"kernel": (4 * d, d), "bias": (d,)}},
    }
    expected = {
        "transformer": {
            "wte": {"embedding": (v, d)},
            "wpe": {"embedding": (p, d)},
            "h": {"0": layer, "1": layer},
            "ln_f": {"scale": (d,), "bias": (d,)},
        }
    }
    assert _shapes(params) == expected


def test_dense_module_paths_are_hf_module_names(params, ids):
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append(".".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(GPT2(CFG).apply, {"params": params}, ids)  # tracing is enough to see the calls
    assert seen == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_init_uses_gpt2_standard_deviations(params):
    # 24*72 samples: the sample std of N(0, 0.02) is within ~5% of 0.02; 15% leaves slack for the seed.
    kernel = params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert abs(float(kernel.std()) - 0.02) < 0.003
    proj = params["transformer"]["h"]["0"]["mlp"]["c_proj"]["kernel"]
    assert abs(float(proj.std()) - 0.02 / math.sqrt(4)) < 0.0015
    assert float(jnp.abs(params["transformer"]["ln_f"]["bias"]).max()) == 0.0


@pytest.mark.parametrize(
    ("preset", "n_params"),
    # Known HF parameter counts for the tied GPT-2 checkpoints.
    [(gpt2_small, 124_439_808), (gpt2_medium, 354_823_168), (gpt2_xl, 1_557_611_200)],
)
def test_presets_have_the_published_parameter_counts(preset, n_params):
    shapes = jax.eval_shape(lambda k: init_gpt2_params(preset(), k), jax.random.key(0))
    assert sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)) == n_params


def test_remat_keeps_paths_logits_and_gradients(params, ids):
    remat_params = jax.eval_shape(GPT2(CFG, remat=True).init, jax.random.key(0), ids)["params"]
    assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)

    def loss(p, model):
        return model.apply({"params": p}, ids).mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compilation instead of per-op dispatch
    g_plain = grad(params, GPT2(CFG))
    g_remat = grad(params, GPT2(CFG, remat=True))
    # Recomputation runs the same ops in the same order; 1e-6 allows XLA fusion differences.
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cached_forward_in_chunks_equals_full_forward(params, ids):
    apply = jax.jit(GPT2(CFG).apply)
    with jax.default_matmul_precision("highest"):
        full = apply({"params": params}, ids)
        cache = init_cache(CFG, batch_size=2, max_length=12)
        first, cache = apply({"params": params}, ids[:, :5], cache=cache)
        second, cache = apply({"params": params}, ids[:, 5:], cache=cache)
    assert int(cache.length) == 9
    # Same fp32 math, only masked-out positions differ: 1e-5 covers summation order.
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, atol=1e-5)


def test_hidden_times_wte_is_the_logits(params, ids):
    with jax.default_matmul_precision("highest"):
        h = jax.jit(GPT2(CFG).apply, static_argnames="method")({"params": params}, ids, method="hidden")
        logits = jax.jit(GPT2(CFG).apply)({"params": params}, ids)
    assert h.shape == (2, 9, CFG.n_embd)
    np.testing.assert_allclose(h @ params["transformer"]["wte"]["embedding"].T, logits, atol=1e-5)


def test_bf16_compute_returns_fp32_logits_close_to_fp32(params, ids):
    fp32 = jax.jit(GPT2(CFG).apply)({"params": params}, ids)
    bf16 = jax.jit(GPT2(CFG, dtype=jnp.bfloat16).apply)({"params": params}, ids)
    hidden_of = functools.partial(GPT2(CFG, dtype=jnp.bfloat16).apply, method="hidden")
    hidden = jax.eval_shape(hidden_of, {"params": params}, ids)
    assert bf16.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (rel. 4e-3 per op); logits here are O(0.1), so 2e-2 absolute.
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(vocab_size=3.5), "vocab_size must be a positive int"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    ],
)
def test_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**kwargs)


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        GPT2Config(50257)  # noqa
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.n_layer = 3  # type: ignore[misc]


def test_from_hf_reads_fields_and_ignores_unrelated_keys(tiny_gpt2_dir):
    cfg = GPT2Config.from_hf(tiny_gpt2_dir)
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (101, 64, 32, 2, 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"activation_function": "xielu"}, "xielu"),
    ],
)
def test_from_hf_rejects_variants_that_change_the_math(override, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 4, **override})


def test_bad_input_ids_raise_before_running(params):
    model = GPT2(CFG)
    with pytest.raises(ValueError, match="batch, time"):
        model.apply({"params": params}, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model.apply({"params": params}, jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="at most 16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="max_length"):
        init_cache(CFG, 1, 17)
