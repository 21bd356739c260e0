"""inject_lora on GPT-2: which modules, how many parameters, and every error path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lora_torch import (
    Conv1DWithLoRA,
    freeze_base_model,
    inject_lora,
    lora_module_names,
    lora_wrappers,
    print_trainable_parameters,
)


@pytest.fixture(scope="module")
def gpt2_small() -> GPT2LMHeadModel:
    """The real GPT-2 small architecture (124M), random init, built once for this module."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config())


@pytest.mark.parametrize(("targets", "trainable", "replaced"), [
    (["c_attn", "c_proj"], 811_008, 36),  # 12 x (c_attn + attn.c_proj + mlp.c_proj)
    (["c_attn"], 294_912, 12),
    (["c_attn", "c_proj", "c_fc"], 1_179_648, 48),  # + 12 x 8 x (768 + 3072)
])
def test_gpt2_small_trainable_counts(gpt2_small, targets, trainable, replaced, capsys):
    model = freeze_base_model(inject_lora(copy.deepcopy(gpt2_small), targets, rank=8, verbose=False))
    stats = print_trainable_parameters(model)
    assert stats["trainable"] == trainable
    assert stats["total"] == 124_439_808 + trainable  # GPT-2 small, tied wte/lm_head counted once
    assert stats["ratio"] == trainable / stats["total"]
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    assert len(lora_module_names(model)) == replaced


def test_replaced_names_and_report(tiny_model, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="lora_torch.inject"):
        inject_lora(tiny_model, ["c_attn", "mlp.c_fc"], rank=2)
    assert lora_module_names(tiny_model) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc",
    ]
    assert isinstance(tiny_model.transformer.h[1].attn.c_attn, Conv1DWithLoRA)
    assert [r.getMessage().split(":")[1] for r in caplog.records] == [" replaced 4 modules (rank=2, alpha=16)"]
    assert capsys.readouterr().out == ""  # a library logs, it does not print
    names = [name for name, _ in tiny_model.named_parameters() if "lora" in name]
    assert names[:2] == ["transformer.h.0.attn.c_attn.lora.lora_A", "transformer.h.0.attn.c_attn.lora.lora_B"]


def test_identity_at_init(tiny_model, token_ids):
    with torch.no_grad():
        before = tiny_model(token_ids).logits
        inject_lora(tiny_model, ["c_attn", "c_proj", "c_fc"], rank=4, verbose=False)
        after = tiny_model(token_ids).logits
    assert torch.equal(before, after)  # B = 0: each wrapper adds an exact 0.0


def test_layers_to_transform(tiny_model):
    inject_lora(tiny_model, ["c_attn", "c_proj"], rank=2, layers_to_transform=[1], verbose=False)
    assert lora_module_names(tiny_model) == [
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]


def test_layers_pattern_names_the_layer_list(tiny_model):
    with pytest.raises(ValueError, match=r"layers_pattern='blocks'\) matched no module"):
        inject_lora(tiny_model, ["c_attn"], rank=2, layers_to_transform=[1], layers_pattern="blocks", verbose=False)
    inject_lora(tiny_model, ["c_attn"], rank=2, layers_to_transform=[1], layers_pattern=["blocks", "h"], verbose=False)
    assert lora_module_names(tiny_model) == ["transformer.h.1.attn.c_attn"]


def test_regex_target(tiny_model):
    inject_lora(tiny_model, r"transformer\.h\.0\.(attn|mlp)\.c_proj", rank=2, verbose=False)
    assert lora_module_names(tiny_model) == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]


def test_no_match_lists_candidates(tiny_model, snapshot, assert_same_state):
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=r"matched no module") as err:
        inject_lora(tiny_model, ["q_proj", "v_proj"], verbose=False)
    assert "transformer.h.{i}.attn.c_attn" in str(err.value) and "lm_head" in str(err.value)
    assert_same_state(tiny_model, before)


def test_unsupported_type_names_supported_types(tiny_model, snapshot, assert_same_state):
    before = snapshot(tiny_model)
    with pytest.raises(TypeError, match=r"GPT2Attention.*torch\.nn.*Linear.*Conv1D"):
        inject_lora(tiny_model, ["c_attn", "attn"], verbose=False)
    assert_same_state(tiny_model, before)  # c_attn was checked first yet not replaced
    assert lora_module_names(tiny_model) == []


def test_double_injection_raises_and_never_nests(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    with pytest.raises(ValueError, match="already carry LoRA"):
        inject_lora(tiny_model, ["c_attn", "c_fc"], rank=4, verbose=False)
    # Nothing changed: still two rank-2 wrappers, no c_fc, no wrapper inside a wrapper.
    assert lora_module_names(tiny_model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert tiny_model.transformer.h[0].attn.c_attn.lora.rank == 2
    assert type(tiny_model.transformer.h[0].attn.c_attn.base_layer) is Conv1D


def test_regex_never_reaches_inside_a_wrapper(tiny_model):
    inject_lora(tiny_model, ["c_fc"], rank=2, verbose=False)
    # base_layer of the c_fc wrappers would fullmatch ".*base_layer"; it is not a target.
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(tiny_model, r".*base_layer", verbose=False)


def test_second_injection_into_other_modules_is_allowed(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    inject_lora(tiny_model, ["c_fc"], rank=2, verbose=False)
    assert len(lora_module_names(tiny_model)) == 4


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"rank": 0}, ValueError, "rank"),
    ({"lora_alpha": -1.0}, ValueError, "lora_alpha"),
    ({"lora_alpha": float("inf")}, ValueError, "lora_alpha must be a finite positive number, got inf"),
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha must be a finite positive number, got nan"),
    ({"layers_to_transform": [-1]}, TypeError, "layers_to_transform"),
    ({"target_modules": ".*c_attn", "layers_to_transform": [0]}, ValueError, "regex"),
    ({"target_modules": 3}, TypeError, "target_modules"),
    ({"layers_to_transform": [0], "layers_pattern": ["h", 0]}, TypeError, "layers_pattern must be None"),
    ({"rank_pattern": {"c_attn": 0}}, ValueError, r"rank_pattern\['c_attn'\] must be a positive int rank, got 0"),
    ({"rank_pattern": {"(c_attn": 2}}, ValueError, r"rank_pattern key '\(c_attn' is read as a regex"),
    ({"alpha_pattern": {"c_attn": float("inf")}}, ValueError, r"alpha_pattern\['c_attn'\] must be a finite number"),
    ({"alpha_pattern": ["c_attn"]}, TypeError, "alpha_pattern must be a dict"),
])
def test_bad_arguments(tiny_model, kwargs, error, message):
    kwargs = {"target_modules": ["c_attn"], **kwargs}
    with pytest.raises(error, match=message):
        inject_lora(tiny_model, verbose=False, **kwargs)
    assert lora_module_names(tiny_model) == []


def test_plain_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    inject_lora(model, ["0"], rank=2, verbose=False)
    # "0" is the exact name of the first layer and the "." suffix of "2.0", as PEFT would match it.
    assert lora_module_names(model) == ["0", "2.0"]
    assert type(model[2][1]) is nn.Linear


def test_rank_and_alpha_patterns_give_each_module_its_own(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="lora_torch.inject"):
        inject_lora(tiny_model, ["c_attn", "c_proj", "c_fc"], rank=4, lora_alpha=8.0,
                    rank_pattern={"h.0.attn.c_attn": 2, "c_fc": 6}, alpha_pattern={"mlp.c_proj": 3})
    got = {name.removeprefix("transformer.h."): (w.lora.rank, w.lora.lora_alpha, w.lora.scaling, tuple(w.lora.lora_A.shape))
           for name, w in lora_wrappers(tiny_model).items()}
    assert got == {
        "0.attn.c_attn": (2, 8.0, 4.0, (32, 2)), "0.attn.c_proj": (4, 8.0, 2.0, (32, 4)),
        "0.mlp.c_fc": (6, 8.0, 8 / 6, (32, 6)), "0.mlp.c_proj": (4, 3.0, 0.75, (128, 4)),
        "1.attn.c_attn": (4, 8.0, 2.0, (32, 4)), "1.attn.c_proj": (4, 8.0, 2.0, (32, 4)),
        "1.mlp.c_fc": (6, 8.0, 8 / 6, (32, 6)), "1.mlp.c_proj": (4, 3.0, 0.75, (128, 4)),
    }
    assert "rank_pattern={'h.0.attn.c_attn': 2, 'c_fc': 6}, alpha_pattern={'mlp.c_proj': 3.0}" in caplog.text


def test_the_first_matching_pattern_key_wins(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=4, rank_pattern={"h.0.attn.c_attn": 2, "c_attn": 5}, verbose=False)
    assert [w.lora.rank for w in lora_wrappers(tiny_model).values()] == [2, 5]
