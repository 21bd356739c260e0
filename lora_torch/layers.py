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

from lora_format.adapter_dir import DEFAULT_ADAPTER
from lora_format.adapter_dir import check_adapter_name as check_subdir_name
from lora_torch.initialize import InitLoraWeights, init_linear_branch
from lora_torch.mixed_batch import BASE_ADAPTER, BatchRouting, check_batch_names, route

# Where a wrapper keeps its adapters: "default" at the tutorial's ``lora``, the others in a ModuleDict.
_DEFAULT_SLOT = "lora"
_EXTRA_SLOT = "lora_adapters"


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


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter, else a ValueError naming the rule.

    The rule is ``lora_format.adapter_dir.check_adapter_name``'s (an adapter is saved in a subdirectory
    of that name), plus torch's for module names: no ``"."`` and not an ``nn.ModuleDict`` attribute
    (``"train"``, ``"double"``, ...); and not ``"__base__"`` (PEFT's word for "no adapter" in a mixed batch).

    >>> check_adapter_name("task_a")
    'task_a'
    >>> check_adapter_name("v1.2")
    Traceback (most recent call last):
    ...
    ValueError: adapter name 'v1.2' holds a '.', which torch module names cannot; use '_' or '-' instead.
    """
    check_subdir_name(name)
    if "." in name:
        raise ValueError(f"adapter name {name!r} holds a '.', which torch module names cannot; use '_' or '-' instead.")
    if name == BASE_ADAPTER:
        raise ValueError(f'"{BASE_ADAPTER}" is reserved: in adapter_names it runs an example without adapter. '
                         "Choose another adapter name.")
    if hasattr(nn.ModuleDict, name):  # torch refuses a submodule named like an attribute ("train", "double", ...)
        raise ValueError(f"adapter name {name!r} is the name of a torch.nn.ModuleDict attribute, which torch refuses "
                         f"as a module name; choose another, e.g. {name + '_adapter'!r}.")
    return name


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
    """Base class of the wrappers: a frozen ``base_layer`` plus named LoRA branches (adapters), summed.

    A wrapper holds one or more adapters by name (PEFT's model): the one named ``"default"`` is the
    submodule ``lora``, the tutorial's name, and every other one is ``lora_adapters[name]``, so a
    single-adapter model has the tutorial's parameter names (``<module>.lora.lora_A``).

    - ``active_adapters`` lists the adapters the forward sums, in that order (PEFT's ``set_adapter``);
      names this module does not hold add nothing here (an adapter may target other modules).
    - ``adapters_disabled``: the forward returns the base output alone (``lora_torch.disable_adapters``).
    - ``forward(x, adapter_names=[...])``: example ``i`` uses adapter ``adapter_names[i]`` or none
      (``"__base__"``), each adapter on its own rows only (``lora_torch.mixed_batch``).
    - ``wrapper.lora`` is the active adapter's branch while exactly one of this module's adapters is
      active; ``wrapper.adapters[name]`` reaches any of them.

    Subclasses say how the base weight relates to the (in, out) kernel orientation of DESIGN.md
    (``base_kernel`` and ``weight_from_kernel``), and which branch class they build (``branch_type``).
    """

    branch_type: ClassVar[type[LoRALayer]] = LoRALayer

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, lora: LoRALayer,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.active_adapters: list[str] = [check_adapter_name(adapter_name)]
        self.adapters_disabled = False
        self.batch_routing: BatchRouting | None = None  # set by lora_torch.adapter_names for a mixed batch
        self._attach(adapter_name, lora)

    # -- the adapters this module holds ------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, LoRALayer]:
        """Every adapter's branch by name: ``"default"`` first, then the others in the order they were added."""
        held = {DEFAULT_ADAPTER: self._modules[_DEFAULT_SLOT]} if _DEFAULT_SLOT in self._modules else {}
        extra = self._modules.get(_EXTRA_SLOT)
        return held | (dict(extra.items()) if extra is not None else {})

    @property
    def lora(self) -> LoRALayer:
        """The active adapter's branch: the tutorial's ``wrapper.lora`` (the only branch of a one-adapter model).

        Raises:
            ValueError: none or several of this module's adapters are active (use ``adapters[name]``).
        """
        active = self.active_names()
        if len(active) != 1:
            # Not AttributeError: nn.Module.__getattr__ would then answer with the "default" slot silently.
            raise ValueError(f"wrapper.lora is the one active adapter of this module, but {len(active)} of its adapters "
                             f"are active ({active}; it holds {list(self.adapters)}). Use wrapper.adapters[name], or "
                             "lora_torch.set_adapter(model, name) first.")
        return self.adapters[active[0]]

    def active_names(self) -> list[str]:
        """The active adapters this module holds, in ``active_adapters`` order."""
        held = self.adapters
        return [name for name in self.active_adapters if name in held]

    def _attach(self, adapter_name: str, lora: LoRALayer) -> None:
        if adapter_name == DEFAULT_ADAPTER:
            self._modules[_DEFAULT_SLOT] = lora  # not setattr: the ``lora`` property would shadow the lookup
        else:
            if _EXTRA_SLOT not in self._modules:  # created on demand: a one-adapter model keeps its module tree
                self._modules[_EXTRA_SLOT] = nn.ModuleDict()
            self._modules[_EXTRA_SLOT][adapter_name] = lora

    @classmethod
    def branch_placement(cls, base_layer: nn.Module) -> dict[str, torch.device | torch.dtype]:
        """The device and dtype of a new branch's parameters: the base weight's (a 4-bit base overrides it)."""
        weight = base_layer.weight
        return {"device": weight.device, "dtype": weight.dtype}

    def new_branch(self, **lora_kwargs) -> LoRALayer:
        """A fresh branch of ``branch_type`` for this module, placed as ``branch_placement`` says."""
        return type(self).branch_type(self.in_features, self.out_features, **self.branch_placement(self.base_layer),
                                      **lora_kwargs)

    def add_adapter(self, adapter_name: str, lora: LoRALayer | None = None, **lora_kwargs) -> LoRALayer:
        """Adds the branch ``lora`` (or a new one built from ``lora_kwargs``) as adapter ``adapter_name``; returns it.

        The new adapter is not made active (``set_adapter`` does that), as in PEFT.

        Raises:
            ValueError: the name is taken here or cannot name an adapter, or the branch has another size or kind.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(f"this module already holds an adapter named {adapter_name!r}; choose a new name, or "
                             f"delete_adapter({adapter_name!r}) first.")
        lora = self.new_branch(**lora_kwargs) if lora is None else lora
        if not isinstance(lora, type(self).branch_type) or (lora.in_features, lora.out_features) != (
                self.in_features, self.out_features):
            raise ValueError(f"{type(self).__name__} takes {type(self).branch_type.__name__} branches of size "
                             f"({self.in_features}, {self.out_features}), got {type(lora).__name__} "
                             f"({lora.in_features}, {lora.out_features}).")
        self._attach(adapter_name, lora)
        return lora

    def delete_adapter(self, adapter_name: str) -> LoRALayer:
        """Removes adapter ``adapter_name`` (and from ``active_adapters``); returns its branch."""
        held = self.adapters
        if adapter_name not in held:
            raise ValueError(f"this module holds no adapter named {adapter_name!r}; it holds {list(held)}.")
        if adapter_name == DEFAULT_ADAPTER:
            del self._modules[_DEFAULT_SLOT]
        else:
            del self._modules[_EXTRA_SLOT][adapter_name]
            if not len(self._modules[_EXTRA_SLOT]):
                del self._modules[_EXTRA_SLOT]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]
        return held[adapter_name]

    def set_adapter(self, adapter_names: str | list[str], *, inference_mode: bool = False) -> None:
        """Makes ``adapter_names`` the active adapters (summed in that order); PEFT's layer ``set_adapter``.

        As in PEFT, the active adapters' parameters get ``requires_grad=True`` (``False`` with
        ``inference_mode``) and every other adapter's ``False``.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_active(names)
        for name, branch in self.adapters.items():
            branch.requires_grad_(name in names and not inference_mode)
        self.active_adapters = names

    def check_active(self, names: list[str]) -> None:
        """Raises unless this module can sum the adapters ``names`` (overridden by DoRA)."""

    # -- forward -----------------------------------------------------------------------------------

    def adapter_output(self, lora: LoRALayer, x: torch.Tensor) -> torch.Tensor:
        """One branch's addition to the base output (overridden by embeddings)."""
        return lora(x)

    def routing(self, adapter_names: list[str] | None) -> BatchRouting | None:
        """The mixed-batch routing of this call: ``adapter_names`` (checked here), else ``batch_routing``."""
        if adapter_names is None:
            return self.batch_routing
        routing = BatchRouting(check_batch_names(adapter_names))
        unknown = sorted(set(routing.names) - set(self.adapters) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"adapter_names names adapters this module does not hold: {unknown}; it holds "
                             f"{list(self.adapters)} (\"{BASE_ADAPTER}\" runs an example without adapter).")
        return routing

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``base_layer(x)`` plus each active adapter's branch; with ``adapter_names``, example ``i``'s adapter only.

        Args:
            x: the input, (batch, ...).
            adapter_names: one adapter name per example (``"__base__"`` for none), PEFT's mixed batch; each
                name must be an adapter of this module or ``"__base__"``.
        """
        routing = self.routing(adapter_names)
        if self.adapters_disabled:
            return self.base_layer(x)
        if routing is not None:
            held = self.adapters
            return route(self.base_layer(x), x, routing,
                         lambda name, sub: self.adapter_output(held[name], sub) if name in held else None)
        # Sum, not composition: the tutorial's lora(linear(x)) applied a second random matrix.
        result = self.base_layer(x)
        held = self.adapters
        for name in self.active_names():
            result = result + self.adapter_output(held[name], x)
        return result

    # -- merge -------------------------------------------------------------------------------------

    def merge_names(self, adapter_names: list[str] | None = None) -> list[str]:
        """The adapters a merge folds in here: ``adapter_names`` (default the active ones) that this module holds."""
        if adapter_names is None:
            return self.active_names()
        held = self.adapters
        return [name for name in adapter_names if name in held]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, in the base layer's own orientation."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias (``None`` when the base has none)."""
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as a dense tensor in the base layer's orientation (a 4-bit base dequantizes)."""
        return self.base_layer.weight

    def base_kernel(self) -> torch.Tensor:
        """The base weight in kernel orientation (in, out); a view, not a copy."""
        return self.base_weight()

    def weight_from_kernel(self, kernel: torch.Tensor) -> torch.Tensor:
        """Turns an (in, out) kernel into the base weight's orientation (the inverse of ``base_kernel``)."""
        return kernel

    def delta_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The merged update of ``adapter_names`` (default: the active adapters), in the base weight's orientation.

        Several adapters are summed, in that order; none gives zeros.
        """
        held = self.adapters
        kernels = [held[name].delta_kernel() for name in self.merge_names(adapter_names)]
        if not kernels:
            return torch.zeros_like(self.base_weight())
        kernel = kernels[0]
        for other in kernels[1:]:
            kernel = kernel + other
        return self.weight_from_kernel(kernel)

    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The weight a merge writes, in the base weight's orientation, as float32: ``W0 + delta_weight()``.

        Summed in float32 at least, so a half-precision base is rounded once (by the merge), not twice.
        """
        delta = self.delta_weight() if adapter_names is None else self.delta_weight(adapter_names)
        return self.base_weight().float() + delta.float()


def _branch_for(wrapper_type: type[LoRAWrapper], base_layer: nn.Module, in_features: int, out_features: int,
                **lora_kwargs) -> LoRALayer:
    return wrapper_type.branch_type(in_features, out_features, **wrapper_type.branch_placement(base_layer),
                                    **lora_kwargs)


class LinearWithLoRA(LoRAWrapper):
    """An ``nn.Linear`` (weight (out, in)) with a LoRA branch; the linear is frozen.

    Args:
        linear: the layer to adapt; kept as ``base_layer``.
        rank: LoRA rank.
        lora_alpha: LoRA alpha.
        dropout: dropout on the branch's input.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` or ``False``, as in ``LoRALayer``.
        adapter_name: the name of this first adapter (``"default"``, as PEFT's); ``add_adapter`` adds more.

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
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearWithLoRA wraps torch.nn.Linear, got {type(linear).__name__}; "
                            "use Conv1DWithLoRA for transformers' Conv1D.")
        lora = _branch_for(type(self), linear, linear.in_features, linear.out_features,
                           rank=rank, lora_alpha=lora_alpha, dropout=dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights)
        super().__init__(linear, linear.in_features, linear.out_features, lora, adapter_name)

    def base_kernel(self) -> torch.Tensor:
        # nn.Linear stores (out, in); the kernel orientation is (in, out).
        return self.base_weight().T

    def weight_from_kernel(self, kernel: torch.Tensor) -> torch.Tensor:
        # nn.Linear stores (out, in), so the (in, out) update is transposed.
        return kernel.T


class Conv1DWithLoRA(LoRAWrapper):
    """A transformers ``Conv1D`` (weight (in, out), as in GPT-2) with a LoRA branch; the conv is frozen.

    Args:
        conv1d: the layer to adapt; kept as ``base_layer``. Sizes come from ``conv1d.weight.shape``.
        rank: LoRA rank.
        lora_alpha: LoRA alpha.
        dropout: dropout on the branch's input.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True``, ``"gaussian"`` or ``False``, as in ``LoRALayer``.
        adapter_name: the name of this first adapter (``"default"``, as PEFT's); ``add_adapter`` adds more.

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
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        if not isinstance(conv1d, Conv1D):
            raise TypeError(f"Conv1DWithLoRA wraps transformers.pytorch_utils.Conv1D, got "
                            f"{type(conv1d).__name__}; use LinearWithLoRA for torch.nn.Linear.")
        in_features, out_features = conv1d.weight.shape
        lora = _branch_for(type(self), conv1d, in_features, out_features,
                           rank=rank, lora_alpha=lora_alpha, dropout=dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights)
        super().__init__(conv1d, in_features, out_features, lora, adapter_name)


# The wrapper for each linear base type; inject_lora's table (lora_torch.inject.WRAPPER_FOR_TYPE) adds embeddings.
LINEAR_WRAPPER_FOR_TYPE: dict[type[nn.Module], type[LoRAWrapper]] = {nn.Linear: LinearWithLoRA,
                                                                     Conv1D: Conv1DWithLoRA}
