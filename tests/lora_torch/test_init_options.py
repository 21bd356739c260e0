"""``init_lora_weights`` (lora_torch.initialize): True, "gaussian" and False draw what PEFT 0.21 draws."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch import LoRALayer, inject_lora, lora_wrappers, save_adapter
from lora_torch.dora import LinearWithDoRA

IN, OUT, RANK = 768, 1024, 64  # A holds 49,152 samples, B 65,536
A_BOUND, B_BOUND = 1 / math.sqrt(IN), 1 / math.sqrt(RANK)
# Std of a uniform on [-b, b] is b / sqrt(3). The relative sampling error of a std over n >= 49,152
# samples is about 1 / sqrt(2n) = 0.32%, so 2% is over 6 standard errors: wide enough never to flake,
# narrow enough to tell 1/r from 1/sqrt(in) (2.0x apart here) or a bound from a std.
STD_RTOL = 0.02
EXPECTED_STD = {  # (A, B)
    True: (A_BOUND / math.sqrt(3), 0.0),
    "gaussian": (1 / RANK, 0.0),
    False: (A_BOUND / math.sqrt(3), B_BOUND / math.sqrt(3)),
}


def _moments(tensor: torch.Tensor) -> dict[str, float]:
    t = tensor.double()
    std = t.std().item()
    # Kurtosis E[(x - mean)^4] / std^4 tells the laws apart: 3 for a normal, 1.8 for a uniform. Its
    # standard error over n samples is about sqrt(24 / n) = 0.022 here, so 0.15 is ~7 of them.
    kurtosis = ((t - t.mean()) ** 4).mean().item() / std**4 if std else 0.0
    return {"std": std, "mean": t.mean().item(), "max": t.abs().max().item(), "kurtosis": kurtosis,
            "zeros": t.eq(0).double().mean().item()}


def _ours(init) -> tuple[dict, dict]:
    torch.manual_seed(0)
    layer = LoRALayer(IN, OUT, rank=RANK, init_lora_weights=init)
    return _moments(layer.lora_A.detach()), _moments(layer.lora_B.detach())


def _peft(init) -> tuple[dict, dict]:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["0"], init_lora_weights=init)
    layer = peft.get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), config).base_model.model[0]
    return _moments(layer.lora_A["default"].weight.detach()), _moments(layer.lora_B["default"].weight.detach())


@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["true", "gaussian", "false"])
def test_moments_follow_the_law(init):
    a, b = _ours(init)
    a_std, b_std = EXPECTED_STD[init]
    assert abs(a["std"] / a_std - 1) < STD_RTOL
    assert abs(a["mean"]) < 5 * a_std / math.sqrt(IN * RANK)  # five standard errors of the mean
    assert abs(a["kurtosis"] - (3.0 if init == "gaussian" else 1.8)) < 0.15
    if init != "gaussian":
        # Uniform on the bound: never past it, and the max of 49k draws is within 0.1% of it.
        assert A_BOUND * 0.999 < a["max"] <= A_BOUND
    if init is False:
        assert abs(b["std"] / b_std - 1) < STD_RTOL and B_BOUND * 0.999 < b["max"] <= B_BOUND
        assert b["zeros"] == 0.0
    else:
        assert b["zeros"] == 1.0  # B = 0: the fresh adapter is the identity


@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["true", "gaussian", "false"])
def test_moments_equal_peft_layers_built_with_the_same_option(init):
    # Our A (in, r) and B (r, out) against PEFT's lora_A.weight (r, in) and lora_B.weight (out, r): the
    # element-wise laws must agree, so std, kurtosis and the zero fraction do (tolerances as above).
    for ours, theirs in zip(_ours(init), _peft(init)):
        assert ours["zeros"] == theirs["zeros"]
        if theirs["zeros"] == 1.0:
            continue
        assert abs(ours["std"] / theirs["std"] - 1) < STD_RTOL
        assert abs(ours["kurtosis"] - theirs["kurtosis"]) < 0.15


@pytest.mark.parametrize("bad", ["pissa", "uniform", 1, None, 0.0])
def test_unknown_choices_are_refused_by_name(bad, tiny_model):
    with pytest.raises(ValueError, match=r'init_lora_weights must be True, "gaussian" or False .* got '):
        inject_lora(tiny_model, ["c_attn"], init_lora_weights=bad, verbose=False)
    assert lora_wrappers(tiny_model) == {}


def test_gaussian_is_matched_in_any_case_as_peft_does():
    torch.manual_seed(0)
    layer = LoRALayer(IN, 8, rank=RANK, init_lora_weights="Gaussian")
    assert abs(layer.lora_A.std().item() * RANK - 1) < STD_RTOL


def test_inject_passes_the_choice_to_every_wrapper(tiny_model, token_ids, tmp_path):
    with torch.no_grad():
        base = tiny_model(token_ids).logits
    inject_lora(tiny_model, ["c_attn", "c_fc"], rank=4, init_lora_weights=False, verbose=False)
    assert all(torch.count_nonzero(w.lora.lora_B).item() == w.lora.lora_B.numel()
               for w in lora_wrappers(tiny_model).values())
    with torch.no_grad():
        assert (tiny_model(token_ids).logits - base).abs().max().item() > 1e-2  # acts from the first step
    save_adapter(tiny_model, tmp_path)
    # The saved weights replace any init when loaded, so the config records PEFT's default.
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_dora_with_b_drawn_starts_its_magnitude_at_the_adapted_norm():
    torch.manual_seed(0)
    layer = LinearWithDoRA(nn.Linear(16, 12), rank=4, init_lora_weights=False)
    adapted = layer.base_layer.weight + layer.lora.scaling * (layer.lora.lora_A @ layer.lora.lora_B).T
    # PEFT sets m = ||W0 + s B A|| per output row whatever the init; with B != 0 that is not ||W0||.
    assert (layer.lora.magnitude - adapted.norm(dim=1)).abs().max().item() < 1e-6
    assert (layer.lora.magnitude - layer.base_layer.weight.norm(dim=1)).abs().max().item() > 1e-3


def test_conv1d_branch_uses_the_conv_input_size_for_the_bound():
    torch.manual_seed(0)
    wrapper = inject_lora(nn.Sequential(Conv1D(nf=1024, nx=IN)), ["0"], rank=RANK, init_lora_weights=False,
                          verbose=False)[0]
    assert A_BOUND * 0.999 < wrapper.lora.lora_A.abs().max().item() <= A_BOUND
    assert B_BOUND * 0.999 < wrapper.lora.lora_B.abs().max().item() <= B_BOUND
