"""The B != 0 guard row, and the adapter values both halves share."""

from __future__ import annotations

import numpy as np
import pytest
from lora_jax import LoraConfig

from parity.adapted import adapt, nonzero_b_row, random_nonzero_b
from parity.transfer import adapter_to_named, named_to_adapter, torch_lora_to_named

CONFIG = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn"])


def test_nonzero_b_row_counts_zero_b_modules():
    a = np.ones((4, 2), np.float32)
    adapter = named_to_adapter({"h.0.c_attn": (a, np.zeros((2, 4), np.float32)),
                                "h.1.c_attn": (a, np.ones((2, 4), np.float32))}, CONFIG)
    row = nonzero_b_row("merge", adapter)
    assert (row.passed, row.max_abs, row.max_rel, row.tolerance.atol) == (False, 1.0, 1.0, 0.0)
    assert row.detail.startswith("B == 0 in 1/2 modules (e.g. h.0.c_attn)")


def test_nonzero_b_row_passes_when_every_b_is_nonzero():
    adapter = named_to_adapter({"h.0.c_attn": (np.ones((4, 2), np.float32), np.ones((2, 4), np.float32))}, CONFIG)
    row = nonzero_b_row("merge", adapter)
    assert (row.passed, row.max_abs, row.max_rel, row.detail) == (True, 0.0, 0.0, "1 modules, all B != 0")


def test_named_round_trip_keeps_arrays_and_config():
    named = {"h.0.c_attn": (np.full((4, 2), 0.5, np.float32), np.full((2, 4), 2.0, np.float32))}
    adapter = named_to_adapter(named, CONFIG)
    assert adapter.config is CONFIG
    back = adapter_to_named(adapter)
    assert list(back) == ["h.0.c_attn"]
    assert all(np.array_equal(x, y) for x, y in zip(back["h.0.c_attn"], named["h.0.c_attn"]))


def test_named_to_adapter_refuses_weights_of_another_rank():
    with pytest.raises(ValueError, match="config says rank 2"):
        named_to_adapter({"h.0.c_attn": (np.ones((4, 3), np.float32), np.ones((3, 4), np.float32))}, CONFIG)


def test_adapter_to_named_refuses_a_bare_tree():
    with pytest.raises(TypeError, match=r"lora_jax.Adapter\(weights, config\)"):
        adapter_to_named({"h": {"0": {"c_attn": {"lora_A": np.ones((4, 2)), "lora_B": np.ones((2, 4))}}}})


def test_random_nonzero_b_keeps_a_and_the_config_and_scales_b():
    a = np.linspace(-1, 1, 64 * 2, dtype=np.float32).reshape(64, 2)
    adapter = named_to_adapter({"h.0.c_attn": (a, np.zeros((2, 512), np.float32))}, CONFIG)
    drawn = random_nonzero_b(adapter, seed=3)
    (a2, b2), = adapter_to_named(drawn).values()
    assert drawn.config is CONFIG and np.array_equal(a2, a)
    # std = 0.1 / (scaling * sqrt(rank)) = 0.1 / (2 * sqrt(2)) = 0.0354, over 1024 draws.
    assert abs(b2.std() - 0.1 / (2.0 * np.sqrt(2.0))) < 3e-3


def test_adapt_copies_one_adapter_into_torch(tiny_pair):
    adapted = adapt(tiny_pair, LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn"]), seed=5)
    jax_named, torch_named = adapter_to_named(adapted.adapter), torch_lora_to_named(adapted.torch_model)
    assert sorted(jax_named) == sorted(torch_named) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    for name, (a, b) in jax_named.items():
        assert np.array_equal(torch_named[name][0], a) and np.array_equal(torch_named[name][1], b) and np.any(b)
    # An Adapter goes in as it is: same arrays, its own config drives the torch injection.
    again = adapt(tiny_pair, adapted.adapter)
    assert again.config is adapted.config
    assert all(np.array_equal(again_b, jax_named[n][1]) for n, (_, again_b) in adapter_to_named(again.adapter).items())
    with pytest.raises(TypeError, match="LoraConfig or a lora_jax.Adapter"):
        adapt(tiny_pair, {"rank": 2})
