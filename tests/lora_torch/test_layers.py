"""LoRALayer and the two wrappers, on hand-made layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch import Conv1DWithLoRA, LinearWithLoRA, LoRALayer, lora_scaling


@pytest.mark.parametrize(("rank", "alpha", "rslora", "expected"),
                         [(8, 16.0, False, 2.0), (4, 16.0, True, 8.0), (1, 3.0, True, 3.0), (16, 8.0, False, 0.5)])
def test_scaling_values(rank, alpha, rslora, expected):
    layer = LoRALayer(10, 5, rank=rank, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling == expected
    assert lora_scaling(rank, alpha, rslora) == expected


def test_init_bound_is_peft_bound():
    torch.manual_seed(0)
    layer = LoRALayer(768, 2304, rank=64)
    bound = 1 / math.sqrt(768)
    assert layer.lora_A.abs().max().item() <= bound
    # 49,152 uniform samples: the max is within 0.1% of the bound, so the bound is not much smaller either.
    assert layer.lora_A.abs().max().item() > 0.999 * bound
    assert torch.count_nonzero(layer.lora_B).item() == 0


def test_forward_is_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = LoRALayer(6, 3, rank=2, lora_alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = (x @ layer.lora_A @ layer.lora_B) * 2.5
    # Same ops in the same order: bit-identical.
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("bad", [{"rank": 0}, {"rank": 2.0}, {"lora_alpha": 0.0}, {"dropout": 1.0}, {"dropout": -0.1}])
def test_bad_settings_raise_value_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRALayer(4, 4, **bad)


@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_alpha_is_refused(alpha):
    # An infinite alpha made scaling inf and every output NaN.
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite positive number, got (-?inf|nan); a common "
                                         r"choice is 2 \* rank \(e\.g\. 16\)"):
        LoRALayer(4, 4, rank=8, lora_alpha=alpha)


def test_linear_wrapper_identity_at_init_and_passthrough():
    torch.manual_seed(0)
    linear = nn.Linear(5, 7)
    wrapped = LinearWithLoRA(linear, rank=3, lora_alpha=6.0)
    x = torch.randn(2, 4, 5)
    assert torch.equal(wrapped(x), linear(x))  # B = 0 adds an exact zero
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias
    assert (wrapped.in_features, wrapped.out_features) == (5, 7)
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert sorted(n for n, p in wrapped.named_parameters() if p.requires_grad) == ["lora.lora_A", "lora.lora_B"]


def test_conv1d_wrapper_sizes_come_from_weight_shape():
    conv = Conv1D(nf=12, nx=4)  # weight (in=4, out=12)
    wrapped = Conv1DWithLoRA(conv, rank=2)
    assert (wrapped.in_features, wrapped.out_features) == (4, 12)
    assert tuple(wrapped.lora.lora_A.shape) == (4, 2)
    assert tuple(wrapped.lora.lora_B.shape) == (2, 12)


@pytest.mark.parametrize(("wrapper", "layer"), [(LinearWithLoRA, Conv1D(4, 3)), (Conv1DWithLoRA, nn.Linear(3, 4))])
def test_wrapper_rejects_wrong_layer_type(wrapper, layer):
    with pytest.raises(TypeError, match="wraps"):
        wrapper(layer)


def test_forward_adds_branch_to_base_not_composes():
    torch.manual_seed(0)
    linear = nn.Linear(5, 5)
    wrapped = LinearWithLoRA(linear, rank=2, lora_alpha=2.0)
    with torch.no_grad():
        wrapped.lora.lora_B.normal_()
    x = torch.randn(3, 5)
    expected = linear(x) + (x @ wrapped.lora.lora_A @ wrapped.lora.lora_B)
    # fp32, 5-wide sums: identical ops up to one addition order, so 1e-6 absolute is ample.
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-6)


def test_dropout_acts_on_branch_input_only():
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=8)
    wrapped = Conv1DWithLoRA(conv, rank=4, lora_alpha=4.0, dropout=0.5).train()
    with torch.no_grad():
        wrapped.lora.lora_B.normal_()
    x = torch.randn(16, 8)
    torch.manual_seed(123)
    out = wrapped(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    expected = conv(x) + dropped @ wrapped.lora.lora_A @ wrapped.lora.lora_B
    # Same mask (same seed); the base path sees the undropped x. fp32 rounding only: atol 1e-5.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (dropped == 0).any()  # the mask really dropped something
    wrapped.eval()
    no_dropout = conv(x) + x @ wrapped.lora.lora_A @ wrapped.lora.lora_B
    torch.testing.assert_close(wrapped(x), no_dropout, rtol=0, atol=1e-5)


def test_linear_delta_is_transposed():
    torch.manual_seed(0)
    wrapped = LinearWithLoRA(nn.Linear(5, 3), rank=2, lora_alpha=4.0)
    with torch.no_grad():
        wrapped.lora.lora_B.normal_()
    assert torch.equal(wrapped.delta_weight(), (2.0 * (wrapped.lora.lora_A @ wrapped.lora.lora_B)).T)
    assert tuple(wrapped.delta_weight().shape) == tuple(wrapped.weight.shape) == (3, 5)
