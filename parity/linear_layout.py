"""GPT-2 with ``nn.Linear`` projections instead of transformers' ``Conv1D``.

Real GPT-2 uses ``Conv1D`` (weight (in, out)), so its merge never transposes. Most other
models use ``nn.Linear`` (weight (out, in)), whose merge must add ``(A @ B).T``. Converting
the same checkpoint to Linear layout lets the merge check exercise that transpose on
the very same numbers, against the same JAX kernels.
"""

from __future__ import annotations

from typing import Any


def conv1d_to_linear(model: Any) -> Any:
    """Replaces every ``Conv1D`` in ``model`` by an equivalent ``nn.Linear``, in place; returns ``model``.

    >>> import torch
    >>> from transformers.pytorch_utils import Conv1D
    >>> conv = Conv1D(nf=3, nx=2)
    >>> model = conv1d_to_linear(torch.nn.Sequential(conv))
    >>> type(model[0]).__name__, tuple(model[0].weight.shape)
    ('Linear', (3, 2))
    >>> x = torch.randn(4, 2)
    >>> bool(torch.allclose(model(x), conv(x)))
    True
    """
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name, conv in convs:
        d_in, d_out = conv.weight.shape
        linear = nn.Linear(d_in, d_out, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)  # (in, out) -> (out, in)
            linear.bias.copy_(conv.bias)
        linear.requires_grad_(conv.weight.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model
