"""DoRA (Liu et al., 2024, arXiv:2402.09353): LoRA whose adapted weight is rescaled per output feature.

In the kernel orientation of DESIGN.md (``K0`` is the base weight as (in, out)):

    V = K0 + s A B,    n = ||V|| per output column (shape (out,)),    W' = (m / n) * V

``m`` (out,) is a trainable magnitude. It starts at ``n``, so a fresh adapter (B = 0) is the identity.
The norm is a constant for the gradient: DoRA's section 4.3 suggests detaching it, and PEFT 0.21 does,
so ``n`` is computed under ``torch.no_grad()``. It is computed once per forward.

The forward never builds ``W'``. With ``f = m / n``, and ``x K0`` the base output without its bias:

    y = base(x) + (f - 1) * (x K0) + f * s * (x A) B

With dropout active (training, ``dropout > 0``) the branch sees the dropped input ``xd``, and, as PEFT
does, ``x K0`` is recomputed on ``xd`` as well; in eval the base output is reused.

A merge writes ``(m / n) * (K0 + s A B)`` (in the base weight's orientation, ``n`` from the unmerged
weights); the bias is unchanged. PEFT saves ``m`` as ``<module>.lora_magnitude_vector``, shape (out,).

>>> import torch
>>> from torch import nn
>>> layer = LinearWithDoRA(nn.Linear(4, 3), rank=2)
>>> tuple(layer.lora.magnitude.shape), torch.allclose(layer.lora.magnitude, layer.base_layer.weight.norm(dim=1))
((3,), True)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch.layers import Conv1DWithLoRA, LinearWithLoRA, LoRALayer, LoRAWrapper

__all__ = ["Conv1DWithDoRA", "DORA_WRAPPER_FOR_TYPE", "DoRALayer", "DoRAWrapper", "LinearWithDoRA"]


class DoRALayer(LoRALayer):
    """A LoRA branch plus DoRA's magnitude ``m``, one entry per output feature.

    The magnitude is a parameter of the branch, so ``lora_parameters``, ``freeze_base_model``,
    ``save_lora_weights`` and the parameter counts see it with A and B. It starts at 1 until the
    wrapper sets it to the weight norm (``reset_magnitude``). Arguments are ``LoRALayer``'s.

    >>> layer = DoRALayer(6, 3, rank=2)
    >>> [name for name, _ in layer.named_parameters()]
    ['lora_A', 'lora_B', 'magnitude']
    """

    use_dora = True

    def __init__(self, in_features: int, out_features: int, rank: int = 8, lora_alpha: float = 16.0,
                 **kwargs) -> None:
        super().__init__(in_features, out_features, rank, lora_alpha, **kwargs)
        self.magnitude = nn.Parameter(torch.ones(out_features, device=self.lora_A.device, dtype=self.lora_A.dtype))

    def weight_norm(self, base_kernel: torch.Tensor) -> torch.Tensor:
        """``||K0 + s A B||`` per output feature (the norm over ``in`` of the (in, out) kernel), shape (out,).

        Computed without autograd: DoRA treats the norm as a constant (paper sec. 4.3, as PEFT).

        >>> layer = DoRALayer(2, 3, rank=1)
        >>> layer.weight_norm(torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 1.0]])).tolist()  # B = 0: ||K0||
        [5.0, 2.0, 1.4142135381698608]
        """
        with torch.no_grad():
            return torch.linalg.norm(base_kernel + self.delta_kernel(), dim=0)

    def reset_magnitude(self, base_kernel: torch.Tensor) -> None:
        """Sets ``m`` to the current weight norm, which makes the DoRA rescaling the identity."""
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm(base_kernel))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRAWrapper(LoRAWrapper):
    """The DoRA forward and merge, shared by ``LinearWithDoRA`` and ``Conv1DWithDoRA``.

    ``m`` is set to ``||W0 + s A B||`` when a branch is made (with B = 0, ``||W0||`` per output).
    A DoRA module may hold several DoRA adapters, but only one can be active at a time: DoRA
    rescales the whole adapted weight, so two DoRA adapters do not add up (PEFT feeds the first one's
    output to the second as its "base", which depends on their order). Mixed batches are refused, as
    PEFT refuses them.
    """

    branch_type = DoRALayer
    lora: DoRALayer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora.reset_magnitude(self.base_kernel())

    def new_branch(self, **lora_kwargs) -> DoRALayer:
        branch = super().new_branch(**lora_kwargs)
        branch.reset_magnitude(self.base_kernel())
        return branch

    def check_active(self, names: list[str]) -> None:
        held = [name for name in names if name in self.adapters]
        if len(held) > 1:
            raise ValueError(f"DoRA adapters cannot be active together ({held}): each rescales the whole adapted "
                             "weight, so they do not add up. Activate one at a time, or merge one first.")

    def _single(self, names: list[str]) -> DoRALayer | None:
        self.check_active(names)
        return self.adapters[names[0]] if names else None

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        routing = self.routing(adapter_names)
        if self.adapters_disabled:
            return self.base_layer(x)
        if routing is not None:
            used = sorted(set(routing.names) & set(self.adapters))
            if used:
                raise ValueError(f"adapter_names (a mixed batch) cannot use DoRA adapters ({used}), as in PEFT; "
                                 "run each DoRA adapter on its own batch with set_adapter.")
            return self.base_layer(x)
        lora = self._single(self.active_names())
        if lora is None:
            return self.base_layer(x)
        kernel = self.base_kernel()  # (in, out)
        base = self.base_layer(x)
        factor = lora.magnitude / lora.weight_norm(kernel)  # (out,), broadcast over the last axis
        dropout = lora.dropout
        if isinstance(dropout, nn.Dropout) and dropout.training:
            x = dropout(x)
            base_no_bias = x @ kernel  # PEFT recomputes it on the dropped input
        else:
            base_no_bias = base if self.bias is None else base - self.bias
        update = (x @ lora.lora_A @ lora.lora_B) * lora.scaling
        return base + (factor - 1) * base_no_bias + factor * update

    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``(m / n) * (W0 + s A B)`` in the base weight's orientation, float32; ``n`` from the unmerged weights.

        One DoRA adapter at most (default: the active one); none gives ``W0``.
        """
        lora = self._single(self.merge_names(adapter_names))
        if lora is None:
            return self.base_layer.weight.float()
        with torch.no_grad():
            adapted = self.base_kernel().float() + lora.delta_kernel().float()  # (in, out)
            norm = torch.linalg.norm(adapted, dim=0)
            return self.weight_from_kernel((lora.magnitude.float() / norm) * adapted)


class LinearWithDoRA(DoRAWrapper, LinearWithLoRA):
    """An ``nn.Linear`` (weight (out, in)) with a DoRA branch; arguments as ``LinearWithLoRA``.

    >>> wrapped = LinearWithDoRA(nn.Linear(6, 3), rank=2, lora_alpha=4.0)
    >>> x = torch.randn(5, 6)
    >>> torch.allclose(wrapped(x), wrapped.base_layer(x), atol=1e-6)  # m = n and B = 0: the identity
    True
    """


class Conv1DWithDoRA(DoRAWrapper, Conv1DWithLoRA):
    """A transformers ``Conv1D`` (weight (in, out), as in GPT-2) with a DoRA branch; arguments as ``Conv1DWithLoRA``.

    >>> wrapped = Conv1DWithDoRA(Conv1D(nf=9, nx=3), rank=2)
    >>> tuple(wrapped.lora.magnitude.shape)
    (9,)
    """


# The DoRA wrapper for each supported base type; inject_lora(use_dora=True) dispatches on this table.
DORA_WRAPPER_FOR_TYPE: dict[type[nn.Module], type[DoRAWrapper]] = {nn.Linear: LinearWithDoRA, Conv1D: Conv1DWithDoRA}
