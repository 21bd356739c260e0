"""LoraConfig: normalisation, scaling and every validation error."""

import dataclasses
import math

import jax
import pytest

from lora_jax.config import LoraConfig


def test_lists_become_tuples_and_config_is_hashable():
    config = LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_proj"], layers_to_transform=[0, 3])
    assert config.target_modules == ("c_attn", "c_proj")
    assert config.layers_to_transform == (0, 3)
    # Hashable and equal by value: usable as a static jit argument.
    assert hash(config) == hash(LoraConfig(rank=4, alpha=8, target_modules=("c_attn", "c_proj"), layers_to_transform=(0, 3)))


def test_layers_pattern_normalised():
    assert LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern=["h", "layers"]).layers_pattern == ("h", "layers")
    assert LoraConfig(target_modules=["q"], layers_pattern="").layers_pattern is None  # PEFT: empty means any


def test_single_int_layer_and_regex_string_are_kept():
    assert LoraConfig(target_modules=["q"], layers_to_transform=2).layers_to_transform == (2,)
    assert LoraConfig(target_modules=r".*\.q").target_modules == r".*\.q"


@pytest.mark.parametrize(("rank", "alpha", "rslora", "expected"), [(8, 16, False, 2.0), (8, 16, True, 16 / math.sqrt(8)), (1, 3.0, False, 3.0), (4, 2.0, True, 1.0)])
def test_scaling(rank, alpha, rslora, expected):
    assert LoraConfig(rank=rank, alpha=alpha, target_modules=["q"], use_rslora=rslora).scaling == pytest.approx(expected, rel=1e-15)


def test_frozen_and_keyword_only():
    config = LoraConfig(target_modules=["q"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 2
    with pytest.raises(TypeError):
        LoraConfig(8, 16.0, ["q"])  # positional arguments are refused


def test_target_modules_is_required():
    with pytest.raises(TypeError, match="target_modules"):
        LoraConfig(rank=8)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, "rank must be > 0"),
        ({"rank": 2.0}, TypeError, "rank must be an int"),
        ({"rank": True}, TypeError, "rank must be an int"),
        ({"alpha": 0.0}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": float("inf")}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": "16"}, TypeError, "alpha must be a number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be a bool"),
        ({"target_modules": []}, ValueError, "target_modules is empty"),
        ({"target_modules": ["q", ""]}, TypeError, "non-empty strings"),
        ({"target_modules": 3}, TypeError, "list/tuple of module names or one regex"),
        ({"target_modules": "(unclosed"}, ValueError, "does not compile"),
        ({"layers_to_transform": [-1]}, ValueError, "ints >= 0"),
        ({"layers_to_transform": []}, ValueError, "use None"),
        ({"layers_to_transform": "0"}, TypeError, "None, an int or a list"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, ValueError, "PEFT ignores layers_to_transform"),
        ({"layers_pattern": "h"}, ValueError, "only takes effect with layers_to_transform"),
        ({"layers_to_transform": [0], "layers_pattern": ["h", 3]}, TypeError, "layers_pattern must be a name"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, error, message):
    fields = {"target_modules": ["q"], **kwargs}
    with pytest.raises(error, match=message):
        LoraConfig(**fields)


def test_config_is_a_static_jit_argument():
    config = LoraConfig(rank=2, alpha=6.0, target_modules=["q"])
    scaled = jax.jit(lambda c: c.scaling * 1.0, static_argnums=0)
    assert float(scaled(config)) == 3.0


def test_patterns_become_hashable_pairs_in_order():
    config = LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc"],
                        rank_pattern={"h.0.attn.c_attn": 2, "c_attn": 5}, alpha_pattern={"c_fc": 3})
    assert config.rank_pattern == (("h.0.attn.c_attn", 2), ("c_attn", 5))
    assert config.alpha_pattern == (("c_fc", 3.0),)
    same = LoraConfig(rank=4, alpha=8, target_modules=("c_attn", "c_fc"),
                      rank_pattern=(("h.0.attn.c_attn", 2), ("c_attn", 5)), alpha_pattern=[("c_fc", 3.0)])
    assert config == same and hash(config) == hash(same)
    assert config != dataclasses.replace(config, rank_pattern={"c_attn": 5, "h.0.attn.c_attn": 2})  # order matters
    assert LoraConfig(target_modules=["q"], rank_pattern=None).rank_pattern == ()


def test_module_rank_alpha_and_scaling_follow_the_first_matching_key():
    config = LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                        rank_pattern={"h.0.attn.c_attn": 2, "c_fc": 6}, alpha_pattern={"mlp.c_proj": 3})
    got = {name: (config.module_rank(name), config.module_alpha(name), config.module_scaling(name)) for name in (
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp.c_proj")}
    assert got == {"transformer.h.0.attn.c_attn": (2, 8.0, 4.0), "transformer.h.1.attn.c_attn": (4, 8.0, 2.0),
                   "transformer.h.0.mlp.c_fc": (6, 8.0, 8 / 6), "transformer.h.1.mlp.c_proj": (4, 3.0, 0.75)}
    rs = dataclasses.replace(config, use_rslora=True)
    assert rs.module_scaling("transformer.h.0.mlp.c_fc") == pytest.approx(8 / math.sqrt(6), rel=1e-15)
    assert config.scaling == 2.0  # the default modules' scaling


@pytest.mark.parametrize(("field", "value", "error", "match"), [
    ("rank_pattern", {"c_attn": 0}, ValueError, r"LoraConfig\.rank_pattern\['c_attn'\] must be a positive int"),
    ("rank_pattern", {"c_attn": 2.5}, ValueError, "positive int rank"),
    ("rank_pattern", {"(c_attn": 2}, ValueError, "does not compile"),
    ("rank_pattern", "c_attn", TypeError, r"LoraConfig\.rank_pattern must be a dict"),
    ("rank_pattern", {"": 2}, TypeError, "keys must be non-empty strings"),
    ("alpha_pattern", {"c_attn": float("nan")}, ValueError, r"LoraConfig\.alpha_pattern\['c_attn'\] must be a finite"),
    ("alpha_pattern", [("c_attn", 2), ("c_attn", 3)], ValueError, "repeats the keys"),
])
def test_bad_patterns_are_refused_at_construction(field, value, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(target_modules=["c_attn"], **{field: value})
