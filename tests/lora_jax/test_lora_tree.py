"""The LoRA tree's flatten/build pair and its structural errors."""

import numpy as np
import pytest

from lora_jax.lora_tree import get_module, lora_modules, nest


def entry(fan_in=4, rank=2, fan_out=3):
    return {"lora_A": np.zeros((fan_in, rank)), "lora_B": np.zeros((rank, fan_out))}


def test_nest_and_flatten_are_inverse():
    entries = {("h", "0", "attn", "c_attn"): entry(), ("h", "1", "mlp", "c_fc"): entry(fan_out=8)}
    tree = nest(entries)
    flat = lora_modules(tree)
    assert list(flat) == list(entries)
    assert [(a.shape, b.shape) for a, b in flat.values()] == [((4, 2), (2, 3)), ((4, 2), (2, 8))]


def test_nest_refuses_nested_or_repeated_paths():
    for order in ([("a", "b"), ("a",)], [("a",), ("a", "b")]):
        with pytest.raises(ValueError, match=r"lies inside another module path"):
            nest({path: entry() for path in order})
    with pytest.raises(ValueError, match="must not be empty"):
        nest({(): entry()})


def test_flatten_refuses_foreign_leaves_and_half_modules():
    with pytest.raises(ValueError, match="Did you pass the params tree"):
        lora_modules({"dense": {"kernel": np.zeros((2, 2))}})
    with pytest.raises(ValueError, match=r"must hold \('lora_A', 'lora_B'\) \(and 'lora_magnitude_vector' for DoRA\)"):
        lora_modules({"dense": {"lora_A": np.zeros((2, 1))}})
    with pytest.raises(ValueError, match=r"got keys \['lora_A', 'lora_magnitude_vector'\]"):
        lora_modules({"dense": {"lora_A": np.zeros((2, 1)), "lora_magnitude_vector": np.ones(2)}})


def test_get_module():
    params = {"a": {"b": {"kernel": np.zeros((2, 2))}}}
    assert get_module(params, ("a", "b"))["kernel"].shape == (2, 2)
    assert get_module(params, ("a", "c")) is None
    assert get_module(params, ("a", "b", "kernel")) is None  # a leaf is not a module
