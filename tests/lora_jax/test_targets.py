"""Target resolution: PEFT's suffix/regex rules, layer selection, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.config import LoraConfig
from lora_jax.gpt2.model import GPT2, GPT2Config
from lora_jax.targets import dotted_name, layer_index, name_matches, resolve_targets


@pytest.fixture(scope="module")
def gpt2_shapes():
    """GPT-2-shaped params (2 layers, width 8) as ShapeDtypeStructs; nothing is allocated."""
    model = GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]


def names(params, **config):
    return [dotted_name(p) for p in resolve_targets(params, LoraConfig(rank=1, **config))]


def test_list_entry_matches_exact_name_or_dot_suffix(gpt2_shapes):
    assert names(gpt2_shapes, target_modules=["c_proj"]) == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]
    assert names(gpt2_shapes, target_modules=["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert names(gpt2_shapes, target_modules=["transformer.h.1.mlp.c_fc"]) == ["transformer.h.1.mlp.c_fc"]


def test_no_substring_matching():
    # The tutorial's substring rule would let "c_proj" hit "c_proj2" and "proj" hit both.
    assert name_matches("m.c_proj2", ("c_proj",)) is False
    assert name_matches("m.c_proj", ("proj",)) is False


def test_regex_is_fullmatched(gpt2_shapes):
    assert names(gpt2_shapes, target_modules=r".*\.1\.attn\.c_(attn|proj)") == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    # A partial regex match is not enough: "c_attn" alone does not fullmatch any dotted name.
    with pytest.raises(ValueError, match="matched no module"):
        names(gpt2_shapes, target_modules="c_attn")


def test_layers_to_transform_selects_layer_indices(gpt2_shapes):
    assert names(gpt2_shapes, target_modules=["c_attn", "c_fc"], layers_to_transform=[1]) == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]


def test_layer_index_is_peft_s():
    assert layer_index(("encoder", "layers", "3", "query")) == 3
    assert layer_index(("model", "layer", "12", "q")) == 12
    assert layer_index(("transformer", "h", "0", "mlp", "experts", "5", "w")) == 0  # the first index, not a nested one
    # PEFT's default needs two names before the number and one after it.
    assert layer_index(("layers", "0", "query")) is None
    assert layer_index(("encoder", "blocks", "4")) is None
    assert layer_index(("layers", "0", "query"), "layers") == 0  # with a pattern the number may start the name
    assert layer_index(("enc", "blocks", "1", "experts", "2", "w"), ("experts",)) == 2


def test_modules_without_layer_index_are_dropped_when_layers_are_selected():
    params = {"top": {"head": {"kernel": np.zeros((4, 4))}},
              "model": {"layers": {"0": {"head": {"kernel": np.zeros((4, 4))}}}}}
    assert names(params, target_modules=["head"]) == ["top.head", "model.layers.0.head"]
    assert names(params, target_modules=["head"], layers_to_transform=0) == ["model.layers.0.head"]
    # As in PEFT, a module named in full is not filtered by layer.
    assert names(params, target_modules=["top.head", "head"], layers_to_transform=0) == ["top.head", "model.layers.0.head"]
    assert names(params, target_modules=["head"], layers_to_transform=0, layers_pattern="layers") == ["model.layers.0.head"]
    with pytest.raises(ValueError, match="matched no module"):
        names(params, target_modules=["head"], layers_to_transform=0, layers_pattern="h")


def test_unknown_target_lists_candidates(gpt2_shapes):
    with pytest.raises(ValueError, match=r"matched no module.*transformer\.h\.0\.attn\.c_attn"):
        names(gpt2_shapes, target_modules=["q_proj"])


def test_non_dense_match_names_supported_types(gpt2_shapes):
    with pytest.raises(ValueError, match=r"cannot adapt: \['transformer.h.0.attn'.*flax.linen.Dense"):
        names(gpt2_shapes, target_modules=["attn"])
    with pytest.raises(ValueError, match=r"cannot adapt: \['transformer.h.0.ln_1'"):
        names(gpt2_shapes, target_modules=["ln_1"])


def test_rank_larger_than_kernel_names_the_module():
    params = {"small": {"kernel": np.zeros((3, 16))}, "big": {"kernel": np.zeros((16, 16))}}
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(in, out\) = 3 of module 'small'"):
        resolve_targets(params, LoraConfig(rank=4, target_modules=["small", "big"]))


def test_variables_dict_is_refused_with_the_fix(gpt2_shapes):
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        names({"params": gpt2_shapes}, target_modules=["c_attn"])
