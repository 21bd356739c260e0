"""The LoRA modules: the low-rank branch and the wrappers that add it to a frozen layer.

Convention (shared with ``lora_jax``, see DESIGN.md): ``A`` is (in, r), ``B`` is (r, out) and

    y = base(x) + s * (dropout(x) @ A) @ B,   s = alpha / r   (or alpha / sqrt(r) with rsLoRA).

By default ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, PEFT's bound (kaiming-uniform with a=sqrt(5) on fan_in=in).
The tutorial applied kaiming to the (in, r) tensor, whose fan_in is r, which makes A about 10x larger
for GPT-2; both halves of this project use PEFT's bound instead. ``B = 0`` makes a fresh adapter the
identity. PEFT's other ``init_lora_weights`` choices are in ``lora_torch.initialize``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch.initialize import InitLoraWeights, init_linear_branch


def lora_scaling(rank: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """Returns the factor ``s`` that multiplies the low-rank branch.

    Args:
        rank: the LoRA rank ``r``.
        lora_alpha: the LoRA ``alpha``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.

    >>> lora_scaling(8, 16.0), lora_scaling(4, 16.0, use_rslora=True)
    (2.0, 8.0)
    """
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def check_lora_settings(rank: int, lora_alpha: float, dropout: float) -> None:
    """Raises a ValueError naming the bad setting and a sensible value.

    ``lora_alpha`` must be finite: an infinite alpha makes the scaling infinite and every output NaN.

    >>> check_lora_settings(8, 16.0, 0.0)
    >>> check_lora_settings(0, 16.0, 0.0)
    Traceback (most recent call last):
    ...
    ValueError: rank must be a positive int, got 0; typical values are 4, 8 or 16.
    >>> check_lora_settings(8, float("inf"), 0.0)
    Traceback (most recent call last):
    ...
    ValueError: lora_alpha must be a finite positive number, got inf; a common choice is 2 * rank (e.g. 16).
    """
    # bool is an int subclass; a rank of True is a bug, not a rank of 1.
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}; typical values are 4, 8 or 16.")
    if (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha)
            or not lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}; a common choice is "
                         f"2 * rank (e.g. {2 * rank}).")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}; use 0.0 to disable it.")


class LoRALayer(nn.Module):
    """The low-rank branch alone: ``forward(x) = (dropout(x) @ lora_A @ lora_B) * scaling``.

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.
        rank: the rank ``r`` of the update.
        lora_alpha: ``alpha``; the branch is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the branch's input only (the base path never sees it).
        use_rslora: use rank-stabilised scaling.
        init_lora_weights: PEFT's init choice: ``True`` (the default above), ``"gaussian"`` (A ~ N(0, 1/r^2),
            B = 0) or ``False`` (B drawn too, so the branch is not zero); see ``lora_torch.initialize``.
        device: where to create the parameters.
        dtype: parameter dtype (float32 unless given).

    >>> layer = LoRALayer(6, 3, rank=2, lora_alpha=4.0)
    >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.scaling
    ((6, 2), (2, 3), 2.0)
    >>> layer(torch.ones(5, 6)).abs().sum().item()  # B = 0: a fresh branch adds nothing
    0.0
    """

    use_dora: ClassVar[bool] = False  # DoRALayer (lora_torch.dora) sets it; the adapter config records it

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_lora_settings(rank, lora_alpha, dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(rank, float(lora_alpha), use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.empty(rank, out_features, **factory))
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: InitLoraWeights = True) -> None:
        """Draws A and B afresh, as ``init_lora_weights`` says (``lora_torch.initialize``)."""
        init_linear_branch(self.lora_A, self.lora_B, init_lora_weights)

    @property
    def dropout_p(self) -> float:
        """The branch's dropout probability (0.0 when disabled)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def delta_kernel(self) -> torch.Tensor:
        """Returns ``scaling * A @ B``, shape (in, out): the update in kernel orientation."""
        return (self.lora_A @ self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x A) B, never x (A B): the (in, out) product is only ever built by merge.
        return (self.dropout(x) @ self.lora_A @ self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoRAWrapper(nn.Module):
    """Base class of the wrappers: a frozen ``base_layer`` plus a ``lora`` branch, summed.

    Subclasses say how the base weight relates to the (in, out) kernel orientation of DESIGN.md
    (``base_kernel`` and ``weight_from_kernel``), and which branch class they build (``branch_type``).
    """

    branch_type: ClassVar[type[LoRALayer]] = LoRALayer

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, lora: LoRALayer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.lora = lora

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, in the base layer's own orientation."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias (``None`` when the base has none)."""
        return self.base_layer.bias

    def base_kernel(self) -> torch.Tensor:
        """The base weight in kernel orientation (in, out); a view, not a copy."""
        return self.base_layer.weight

    def weight_from_kernel(self, kernel: torch.Tensor) -> torch.Tensor:
        """Turns an (in, out) kernel into the base weight's orientation (the inverse of ``base_kernel``)."""
        return kernel

    def delta_weight(self) -> torch.Tensor:
        """Returns the merged update in the base weight's orientation (overridden per layer type)."""
        return self.lora.delta_kernel()

    def merged_weight(self) -> torch.Tensor:
        """The weight a merge writes, in the base weight's orientation, as float32: ``W0 + delta_weight()``.

        Summed in float32 at least, so a half-precision base is rounded once (by the merge), not twice.
        """
        return self.base_layer.weight.float() + self.delta_weight().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sum, not composition: the tutorial's lora(linear(x)) applied a second random matrix.
        return self.base_layer(x) + self.lora(x)


def _branch_for(branch_type: type[LoRALayer], weight: torch.Tensor, in_features: int, out_features: int,
                **lora_kwargs) -> LoRALayer:
    return branch_type(in_features, out_features, device=weight.device, dtype=weight.dtype, **lora_kwargs)


class LinearWithLoRA(LoRAWrapper):
    """An ``nn.Linear`` (weight (out, in)) with a LoRA branch; the linear is frozen.

    Args:
        linear: the layer to adapt; kept as ``base_layer``.
        rank: LoRA rank.
        lora_alpha: LoRA alpha.
        dropout: dropout on the branch's input.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` or ``False``, as in ``LoRALayer``.

    >>> wrapped = LinearWithLoRA(nn.Linear(6, 3), rank=2, lora_alpha=4.0)
    >>> wrapped.base_layer.weight.requires_grad, tuple(wrapped.delta_weight().shape)
    (False, (3, 6))
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearWithLoRA wraps torch.nn.Linear, got {type(linear).__name__}; "
                            "use Conv1DWithLoRA for transformers' Conv1D.")
        lora = _branch_for(type(self).branch_type, linear.weight, linear.in_features, linear.out_features,
                           rank=rank, lora_alpha=lora_alpha, dropout=dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights)
        super().__init__(linear, linear.in_features, linear.out_features, lora)

    def base_kernel(self) -> torch.Tensor:
        # nn.Linear stores (out, in); the kernel orientation is (in, out).
        return self.base_layer.weight.T

    def weight_from_kernel(self, kernel: torch.Tensor) -> torch.Tensor:
        return kernel.T

    def delta_weight(self) -> torch.Tensor:
        # nn.Linear stores (out, in), so the (in, out) update is transposed.
        return self.lora.delta_kernel().T


class Conv1DWithLoRA(LoRAWrapper):
    """A transformers ``Conv1D`` (weight (in, out), as in GPT-2) with a LoRA branch; the conv is frozen.

    Args:
        conv1d: the layer to adapt; kept as ``base_layer``. Sizes come from ``conv1d.weight.shape``.
        rank: LoRA rank.
        lora_alpha: LoRA alpha.
        dropout: dropout on the branch's input.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` or ``False``, as in ``LoRALayer``.

    >>> wrapped = Conv1DWithLoRA(Conv1D(nf=9, nx=3), rank=2)
    >>> wrapped.in_features, wrapped.out_features, tuple(wrapped.delta_weight().shape)
    (3, 9, (3, 9))
    """

    def __init__(
        self,
        conv1d: Conv1D,
        rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
    ) -> None:
        if not isinstance(conv1d, Conv1D):
            raise TypeError(f"Conv1DWithLoRA wraps transformers.pytorch_utils.Conv1D, got "
                            f"{type(conv1d).__name__}; use LinearWithLoRA for torch.nn.Linear.")
        in_features, out_features = conv1d.weight.shape
        lora = _branch_for(type(self).branch_type, conv1d.weight, in_features, out_features,
                           rank=rank, lora_alpha=lora_alpha, dropout=dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights)
        super().__init__(conv1d, in_features, out_features, lora)


# The wrapper for each linear base type; inject_lora's table (lora_torch.inject.WRAPPER_FOR_TYPE) adds embeddings.
LINEAR_WRAPPER_FOR_TYPE: dict[type[nn.Module], type[LoRAWrapper]] = {nn.Linear: LinearWithLoRA,
                                                                     Conv1D: Conv1DWithLoRA}
