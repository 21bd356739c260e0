"""``target_modules="all-linear"`` and ``init_lora_weights`` in lora_jax, against PEFT 0.21 itself."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import GPT2LMHeadModel

import lora_jax
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.targets import dotted_name, resolve_targets

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def params(tiny_gpt2_dir):
    return load_gpt2(tiny_gpt2_dir)[1]


def peft_lora_names(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_all_linear_selects_what_peft_selects(params, tiny_gpt2_dir, spelling):
    theirs = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=spelling))
    ours = {dotted_name(p) for p in resolve_targets(params, lora_jax.LoraConfig(rank=2, target_modules=spelling))}
    assert ours == peft_lora_names(theirs)
    assert len(ours) == 8 and "lm_head" not in ours  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)


def test_all_linear_leaves_out_a_top_level_lm_head():
    tree = {"body": {"kernel": np.zeros((4, 4))}, "lm_head": {"kernel": np.zeros((4, 9))}}
    assert resolve_targets(tree, lora_jax.LoraConfig(rank=2, target_modules="all-linear")) == (("body",),)


def test_an_all_linear_adapter_is_saved_with_the_names_peft_expands_to(params, tiny_gpt2_dir, tmp_path):
    config = lora_jax.LoraConfig(rank=2, alpha=4, target_modules="all-linear", init_lora_weights=False)
    adapter = lora_jax.init_lora(params, config, jax.random.key(0))
    lora_jax.save_adapter(tmp_path, adapter)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == sorted(dotted_name(p) for p in adapter.modules())
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), tmp_path)
    assert peft_lora_names(theirs) == set(saved)
    assert lora_jax.load_adapter(tmp_path, params).modules().keys() == adapter.modules().keys()


def test_a_config_file_saying_all_linear_loads(params, tiny_gpt2_dir, tmp_path):
    # PEFT saves the expanded names, but a hand-written or older config may hold the shorthand itself.
    config = lora_jax.LoraConfig(rank=2, alpha=4, target_modules="all-linear")
    adapter = lora_jax.init_lora(params, config, jax.random.key(0))
    lora_jax.save_adapter(tmp_path, adapter)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["target_modules"] = "all-linear"
    assert lora_jax.peft_format.config_from_adapter_dict(meta).target_modules == "all-linear"


def _peft_factors(init, fan_in=256, fan_out=64, rank=8, seed=0):
    torch.manual_seed(seed)
    layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out)),
                                peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["0"], init_lora_weights=init))
    module = layer.base_model.model[0]
    return module.lora_A["default"].weight.detach().numpy().T, module.lora_B["default"].weight.detach().numpy().T


def _ours(init, fan_in=256, fan_out=64, rank=8):
    return lora_jax.initialize.fresh_factors(jax.random.key(0), fan_in, fan_out, rank, init)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_options_draw_from_peft_distributions(init):
    # 2048 draws of A, 512 of B: the sample std of a uniform/normal is within 5% of its true value with margin
    # (its relative standard error is ~1.6% and ~3%); the bound checks are exact.
    (a, b), (peft_a, peft_b) = _ours(init), _peft_factors(init)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == peft_a.shape == (256, 8) and b.shape == peft_b.shape == (8, 64)
    want_a = 1 / 8 if init == "gaussian" else (1 / 16) / np.sqrt(3)  # N(0, 1/r^2) or U(+-1/sqrt(in))
    assert np.std(a) == pytest.approx(want_a, rel=0.05) and np.std(peft_a) == pytest.approx(want_a, rel=0.05)
    if init is False:  # B ~ U(+-1/sqrt(r)), PEFT's nn.Linear default
        bound = 1 / np.sqrt(8)
        assert np.abs(b).max() <= bound and np.abs(peft_b).max() <= bound
        assert np.std(b) == pytest.approx(bound / np.sqrt(3), rel=0.1)
        assert np.std(peft_b) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    else:
        assert np.abs(b).max() == 0 and np.abs(peft_b).max() == 0
    if not isinstance(init, str):  # uniform A: bounded
        assert np.abs(a).max() <= 1 / 16 and np.abs(peft_a).max() <= 1 / 16


def test_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match=r"init_lora_weights must be one of \(True, 'gaussian', False\), got 'pissa'"):
        lora_jax.LoraConfig(rank=2, target_modules=["x"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="got 1"):
        lora_jax.LoraConfig(rank=2, target_modules=["x"], init_lora_weights=1)


def test_init_false_makes_an_adapter_that_acts(params):
    adapter = lora_jax.init_lora(params, lora_jax.LoraConfig(rank=2, target_modules=["c_fc"], init_lora_weights=False),
                                 jax.random.key(1))
    assert all(float(jnp.abs(b).max()) > 0 for _, b in adapter.modules().values())
