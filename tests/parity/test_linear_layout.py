"""The Linear-layout GPT-2 is the same function as the Conv1D one."""

from __future__ import annotations

import numpy as np
from torch import nn

from parity.linear_layout import conv1d_to_linear


def test_linear_layout_gpt2_gives_identical_logits(tiny_pair):
    ids = np.arange(12).reshape(2, 6)
    linear = conv1d_to_linear(tiny_pair.torch_copy())
    assert isinstance(linear.transformer.h[0].attn.c_attn, nn.Linear)
    assert tuple(linear.transformer.h[0].attn.c_attn.weight.shape) == (96, 32)  # (out, in)
    # Same products, same order per output: float32 addmm vs matmul differ by rounding at most.
    diff = np.abs(tiny_pair.torch_logits(linear, ids) - tiny_pair.torch_logits(tiny_pair.torch_model, ids))
    assert diff.max() < 1e-6
