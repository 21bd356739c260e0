"""init_lora: shapes, dtype, PEFT's bound for A, zero B, determinism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.initialize import a_init_bound, init_lora


def test_shapes_dtype_and_tree_mirror_kernels():
    params = {"enc": {"layers": {"0": {"q": {"kernel": jnp.zeros((12, 20), jnp.bfloat16), "bias": jnp.zeros(20)}}}}}
    config = LoraConfig(rank=3, target_modules=["q"])
    adapter = init_lora(params, config, jax.random.key(0))
    assert isinstance(adapter, Adapter) and adapter.config is config
    a, b = adapter.weights["enc"]["layers"]["0"]["q"]["lora_A"], adapter.weights["enc"]["layers"]["0"]["q"]["lora_B"]
    assert (a.shape, b.shape) == ((12, 3), (3, 20))
    assert a.dtype == b.dtype == jnp.float32  # fp32 LoRA even for a bf16 base
    assert float(jnp.abs(b).max()) == 0.0


def test_a_is_uniform_with_peft_bound():
    fan_in = 768
    params = {"w": {"kernel": jnp.zeros((fan_in, 64))}}
    a = init_lora(params, LoraConfig(rank=64, target_modules=["w"]), jax.random.key(1)).weights["w"]["lora_A"]
    bound = 1 / math.sqrt(fan_in)
    assert a_init_bound(fan_in) == bound
    assert float(jnp.abs(a).max()) <= bound
    # 49,152 uniform samples: the max reaches within 0.1% of the bound, the std is bound/sqrt(3) within 1%.
    assert float(jnp.abs(a).max()) > 0.999 * bound
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_same_key_same_tree_and_modules_differ():
    params = {"x": {"kernel": np.zeros((8, 8))}, "y": {"kernel": np.zeros((8, 8))}}
    config = LoraConfig(rank=2, target_modules=["x", "y"])
    first, second = init_lora(params, config, jax.random.key(5)), init_lora(params, config, jax.random.key(5))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(jnp.array_equal(u, v)), first, second))
    assert not bool(jnp.array_equal(first.weights["x"]["lora_A"], first.weights["y"]["lora_A"]))


def test_works_under_eval_shape():
    params = {"m": {"kernel": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}}
    shapes = jax.eval_shape(lambda k: init_lora(params, LoraConfig(rank=8, target_modules=["m"]), k), jax.random.key(0))
    assert [(p, a.shape, b.shape) for p, (a, b) in shapes.modules().items()] == [(("m",), (1024, 8), (8, 4096))]


def test_bad_target_raises_before_any_array_is_made():
    with pytest.raises(ValueError, match="matched no module"):
        init_lora({"m": {"kernel": np.zeros((4, 4))}}, LoraConfig(rank=1, target_modules=["z"]), jax.random.key(0))


def test_plain_int_seed_is_refused():
    with pytest.raises(TypeError, match=r"jax.random.key\(0\)"):
        init_lora({"m": {"kernel": np.zeros((4, 4))}}, LoraConfig(rank=1, target_modules=["m"]), 0)
