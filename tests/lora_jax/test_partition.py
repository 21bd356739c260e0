"""split / combine are exact inverses; trainable_mask marks LoRA leaves only."""

import jax
import pytest

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.initialize import init_lora
from lora_jax.partition import combine, split, trainable_labels, trainable_mask
from tests.lora_jax.encoder_model import Encoder, init_encoder


@pytest.fixture(scope="module")
def trees():
    params = init_encoder(Encoder())
    lora = init_lora(params, LoraConfig(rank=2, target_modules=["query", "value", "head"]), jax.random.key(0))
    return params, lora


def same_tree(x, y) -> bool:
    """Equal structure and identical leaves (the very same objects)."""
    if jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(y):
        return False
    return all(u is v for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def test_split_inverts_combine(trees):
    params, lora = trees
    frozen, weights = split(combine(params, lora))
    assert same_tree(frozen, params)
    assert same_tree(weights, lora.weights)
    # The combined tree holds arrays only; the config rebuilds the adapter exactly.
    assert same_tree(Adapter(weights, lora.config), lora)


def test_combine_inverts_split(trees):
    full = combine(*trees)
    assert same_tree(combine(*split(full)), full)
    assert sorted(full["encoder"]["layers"]["1"]["query"]) == ["bias", "kernel", "lora_A", "lora_B"]
    assert sorted(full["encoder"]["layers"]["1"]["key"]) == ["bias", "kernel"]


def test_combine_does_not_modify_inputs(trees):
    params, lora = trees
    combine(params, lora)
    assert "lora_A" not in params["head"]


def test_mask_and_labels(trees):
    full = combine(*trees)
    mask = trainable_mask(full)
    assert sum(jax.tree_util.tree_leaves(mask)) == 2 * 5  # query and value in 2 layers, plus head
    assert mask["head"] == {"bias": False, "kernel": False, "lora_A": True, "lora_B": True}
    assert trainable_labels(full)["encoder"]["layers"]["0"]["value"]["lora_B"] == "lora"
    assert trainable_labels(full)["embed"]["embedding"] == "frozen"


def test_combine_rejects_foreign_paths_and_double_combine(trees):
    params, lora = trees
    with pytest.raises(ValueError, match="'decoder' has no matching module"):
        combine(params, {"decoder": lora.weights["head"]})
    with pytest.raises(ValueError, match="combined twice"):
        combine(combine(params, lora), lora)
