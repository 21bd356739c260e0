"""The default implementations hand every LoraConfig field to lora_torch, so both halves select alike."""

from __future__ import annotations

import pytest
from lora_jax import LoraConfig, resolve_targets

from parity.checks.injection import check_injection
from parity.implementations import inject_torch
from parity.suite import describe_lora


def test_layers_pattern_reaches_torch_injection(tiny_pair):
    # GPT-2 names its layer list "h": with that pattern both halves adapt layer 1 only.
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn"], layers_to_transform=(1,), layers_pattern="h")
    result = check_injection(tiny_pair, config)
    assert [(row.name, row.passed) for row in result.rows] == [
        ("module names [c_attn@layers=1@pattern=h]", True),
        ("trainable params [c_attn@layers=1@pattern=h]", True),
        ("modules with shape mismatch [c_attn@layers=1@pattern=h]", True),
    ]
    assert result.rows[0].detail == "1 identical"


def test_layers_pattern_naming_no_layer_list_selects_nothing_in_both_halves(tiny_pair):
    # No "blocks" list in GPT-2: JAX finds no layer index, so nothing matches. Dropping the pattern on
    # the torch side would fall back to the default rule and adapt h.0 instead.
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn"], layers_to_transform=(0,),
                        layers_pattern="blocks")
    with pytest.raises(ValueError, match="matched no module"):
        inject_torch(tiny_pair.torch_copy(), config)
    with pytest.raises(ValueError):
        resolve_targets(tiny_pair.jax_params, config)


def test_describe_lora_reports_layers_pattern():
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn"], layers_to_transform=(0, 1),
                        layers_pattern=["h", "layers"])
    assert describe_lora(config) == {"targets": "c_attn", "rank": 2, "alpha": 4.0, "use_rslora": False,
                                     "scaling": 2.0, "layers_to_transform": "0,1", "layers_pattern": "h,layers"}
