"""Target matching follows PEFT's rule exactly, checked against peft's own function."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from lora_torch.targeting import check_target_modules, layer_index, module_is_targeted, summarize_names

GPT2_NAMES = [
    "transformer.wte", "transformer.h", "transformer.h.0", "transformer.h.0.attn", "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj", "transformer.h.0.mlp", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
    "transformer.h.1.attn.c_attn", "transformer.h.11.mlp.c_proj", "lm_head",
]

SETTINGS = [
    (["c_attn"], None),
    (["c_proj"], None),
    (["attn.c_proj"], None),
    (["c_attn", "c_fc"], [0]),
    (["c_proj"], [1, 11]),
    (["transformer.h.1.attn.c_attn"], [0]),  # exact names ignore layers_to_transform, as in PEFT
    (r".*\.h\.\d+\.attn\.c_(attn|proj)", None),
    ("attn", None),
    (["attn"], None),
]


@pytest.mark.parametrize(("target_modules", "layers"), SETTINGS)
def test_matches_peft_on_gpt2_names(target_modules, layers):
    config = LoraConfig(target_modules=target_modules, layers_to_transform=layers)
    ours = [name for name in GPT2_NAMES if module_is_targeted(name, target_modules, layers)]
    peft = [name for name in GPT2_NAMES if check_target_module_exists(config, name)]
    assert ours == peft


def test_suffix_match_is_not_substring_match():
    # The tutorial's `"c_proj" in name` also hit "c_proj_extra" and whole blocks; ours must not.
    assert module_is_targeted("transformer.h.0.mlp.c_proj", ["c_proj"]) is True
    assert module_is_targeted("transformer.h.0.mlp.c_proj_extra", ["c_proj"]) is False
    assert module_is_targeted("transformer.h.0.attn", ["at"]) is False


def test_regex_is_fullmatched():
    assert module_is_targeted("transformer.h.0.attn.c_attn", "c_attn") is False
    assert module_is_targeted("transformer.h.0.attn.c_attn", r".*c_attn") is True


@pytest.mark.parametrize(("name", "pattern", "expected"), [
    ("transformer.h.7.attn.c_attn", None, 7),
    ("transformer.h.7.attn.c_attn", "h", 7),
    ("model.layers.2.experts.5.w1", None, 2),
    ("lm_head", None, None),
    ("transformer.h.7.attn.c_attn", "layers", None),
])
def test_layer_index(name, pattern, expected):
    assert layer_index(name, pattern) == expected


@pytest.mark.parametrize(("bad", "error"), [([], ValueError), (None, TypeError), (["c_attn", 3], TypeError),
                                            ("c_(attn", ValueError)])
def test_bad_target_modules(bad, error):
    with pytest.raises(error, match="target_modules"):
        check_target_modules(bad)


def test_summarize_names_collapses_layer_indices():
    names = [f"transformer.h.{i}.{m}" for i in range(12) for m in ("attn.c_attn", "mlp.c_fc")] + ["lm_head"]
    assert summarize_names(names) == ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.mlp.c_fc", "lm_head"]
