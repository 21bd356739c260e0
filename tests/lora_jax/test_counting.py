"""Parameter counts, including GPT-2 small's real numbers without allocating it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.config import LoraConfig
from lora_jax.counting import count_params, lora_param_count, trainable_summary
from lora_jax.gpt2.model import GPT2, gpt2_small
from lora_jax.initialize import init_lora


@pytest.fixture(scope="module")
def gpt2_small_shapes():
    return jax.eval_shape(GPT2(gpt2_small()).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def test_gpt2_small_total(gpt2_small_shapes):
    assert count_params(gpt2_small_shapes) == 124_439_808  # HF GPT-2 small, tied head counted once


@pytest.mark.parametrize(("targets", "expected"), [(["c_attn", "c_proj"], 811_008), (["c_attn"], 294_912)])
def test_gpt2_small_lora_counts_at_rank_8(gpt2_small_shapes, targets, expected):
    # c_attn: 12 * 8 * (768 + 2304); attn.c_proj and mlp.c_proj add 12 * 8 * (768 + 768) and 12 * 8 * (3072 + 768).
    config = LoraConfig(rank=8, target_modules=targets)
    assert lora_param_count(gpt2_small_shapes, config) == expected
    shapes = jax.eval_shape(lambda k: init_lora(gpt2_small_shapes, config, k), jax.random.key(0))
    assert count_params(shapes) == expected


def test_summary_ratio():
    frozen = {"w": {"kernel": np.zeros((100, 100))}}
    summary = trainable_summary(frozen, {"w": {"lora_A": np.zeros((100, 1)), "lora_B": np.zeros((1, 100))}})
    assert summary == {"trainable": 200, "total": 10_200, "ratio": 200 / 10_200}


def test_gpt2_small_count_with_rank_pattern(gpt2_small_shapes):
    # c_attn at r=8 except layer 0 at r=2: 11 * 8 * (768 + 2304) + 2 * (768 + 2304); c_fc at r=4: 12 * 4 * (768 + 3072).
    config = LoraConfig(rank=8, target_modules=["c_attn", "c_fc"], rank_pattern={"h.0.attn.c_attn": 2, "c_fc": 4})
    expected = 11 * 8 * 3072 + 2 * 3072 + 12 * 4 * 3840
    assert expected == 460_800
    assert lora_param_count(gpt2_small_shapes, config) == expected
    shapes = jax.eval_shape(lambda k: init_lora(gpt2_small_shapes, config, k), jax.random.key(0))
    assert count_params(shapes) == expected


def test_a_pattern_rank_beyond_the_kernel_is_refused():
    params = {"q": {"kernel": np.zeros((8, 8))}, "v": {"kernel": np.zeros((8, 4))}}
    with pytest.raises(ValueError, match=r"rank_pattern gives module 'v' rank 5, more than min\(in, out\) = 4"):
        lora_param_count(params, LoraConfig(rank=2, target_modules=["q", "v"], rank_pattern={"v": 5}))
