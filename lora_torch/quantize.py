"""QLoRA (Dettmers et al., 2023, arXiv:2305.14314): a frozen 4-bit NF4 base from the real bitsandbytes, LoRA on top.

``quantize_base(model)`` replaces the layers transformers' 4-bit loading replaces with
``bitsandbytes.nn.Linear4bit`` (NF4, double-quantized statistics), with the same bytes;
``inject_lora`` then wraps each ``Linear4bit`` in a ``Linear4bitWithLoRA`` (``Linear4bitWithDoRA``
with ``use_dora=True``). The base output is bitsandbytes' own ``Linear4bit.forward``; the branch keeps
float32 parameters (PEFT's choice: the trained values never live in the base's precision) and runs on
the input cast to them. ``merge_lora_weights`` dequantizes (``lora_torch.merge``).

bitsandbytes is optional: it is imported on first use, and a missing install raises
``BitsandbytesMissingError`` (an ``ImportError``) that names the command.

>>> import torch
>>> from torch import nn
>>> model = quantize_base(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), target_modules=["0"])
>>> type(model[0]).__name__, model[0].weight.dtype, tuple(model[0].weight.shape)
('Linear4bit', torch.uint8, (2048, 1))
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from types import ModuleType

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch.dora import DoRAWrapper
from lora_torch.layers import LinearWithLoRA, LoRALayer, LoRAWrapper
from lora_torch.targeting import TargetModules, check_target_modules, module_is_targeted, summarize_names

logger = logging.getLogger(__name__)

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes.functional.quantize_4bit's list
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL_HINT = 'pip install "bitsandbytes>=0.45,<0.51"  (or, in this repository, pip install -e .[qlora])'


class BitsandbytesMissingError(ImportError):
    """bitsandbytes is needed (a 4-bit base) and is not installed; the message names the install command."""


def import_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, or a ``BitsandbytesMissingError`` naming the install command."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise BitsandbytesMissingError(f"QLoRA needs bitsandbytes, which is not importable here ({error}). "
                                       f"Install it with: {INSTALL_HINT}") from error


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit``; never imports bitsandbytes (no import, no instance).

    >>> is_linear4bit(nn.Linear(2, 2))
    False
    """
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


# -- quantize_base ---------------------------------------------------------------------------------

def kept_dense(model: nn.Module) -> set[str]:
    """The modules transformers' 4-bit loading keeps in full precision (``get_keys_to_not_convert``):
    the output layer (``model.get_output_embeddings()``), every module whose weight is tied to another
    module's, and the module holding the model's last parameter."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    kept = {name for name, module in model.named_modules() if output is not None and module is output}
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    kept |= {name for names in owners.values() if len(names) > 1 for name in names}
    params = list(model.named_parameters())
    if params:
        kept.add(params[-1][0].rpartition(".")[0])
    return kept


def _quantizable(module: nn.Module) -> bool:
    # transformers' replace_with_bnb_linear: Conv1D, or exactly nn.Linear (not a subclass such as Linear4bit).
    return isinstance(module, Conv1D) or type(module) is nn.Linear


def select_quantized(model: nn.Module, target_modules: TargetModules | None = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``quantize_base`` replaces; raises a ValueError if none or a target is kept dense.

    >>> [name for name, _ in select_quantized(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))]
    ['0']
    """
    kept = kept_dense(model)
    linear = [(name, module) for name, module in model.named_modules() if name and _quantizable(module)]
    if target_modules is None:
        chosen = [(name, module) for name, module in linear if name not in kept]
    else:
        check_target_modules(target_modules)
        matched = [(name, module) for name, module in linear if module_is_targeted(name, target_modules)]
        refused = [name for name, _ in matched if name in kept]
        if refused:
            raise ValueError(f"target_modules={target_modules!r} selects {refused}, which transformers' 4-bit loading "
                             "keeps in full precision (the output layer, tied weights, the last layer); leave them "
                             "out of target_modules.")
        chosen = matched
    if not chosen:
        raise ValueError(f"quantize_base found no layer to quantize in {type(model).__name__} (target_modules="
                         f"{target_modules!r}); it replaces Conv1D and torch.nn.Linear layers. Candidates: "
                         f"{summarize_names([name for name, _ in linear if name not in kept])}")
    return chosen


def check_quantize_settings(block_size: int, double_quant: bool, compute_dtype: torch.dtype) -> None:
    """Raises a ValueError / TypeError naming the bad setting.

    >>> check_quantize_settings(100, True, torch.float32)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: block_size=100 is not one bitsandbytes accepts; use one of (32, 64, 128, 256, 512, 1024, 2048, ...
    """
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not one bitsandbytes accepts; use one of {BLOCK_SIZES} "
                         "(64, the QLoRA default, is what transformers' 4-bit loading uses).")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r} is not a float dtype bitsandbytes computes in; use one of "
                         f"{COMPUTE_DTYPES}.")


def check_unquantized(model: nn.Module) -> None:
    """Raises a ValueError if ``model`` holds bitsandbytes layers or LoRA; bitsandbytes must be imported already."""
    bnb = sys.modules["bitsandbytes"]
    quantized = [name for name, module in model.named_modules()
                 if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    if quantized:
        raise ValueError(f"{type(model).__name__} is quantized already ({summarize_names(quantized)}); "
                         "quantize_base takes a full-precision model. Load it again without a quantization_config.")
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRAWrapper)]
    if wrapped:
        raise ValueError(f"{type(model).__name__} carries LoRA already ({summarize_names(wrapped)}); quantize the "
                         "base first, then inject_lora (QLoRA keeps the adapter in full precision).")


def check_weights(chosen: list[tuple[str, nn.Module]]) -> None:
    """Raises a ValueError unless every chosen weight is a float bitsandbytes quantizes, holding values."""
    bad = [f"{name} ({module.weight.dtype}, {module.weight.device.type})" for name, module in chosen
           if module.weight.dtype not in COMPUTE_DTYPES or module.weight.device.type == "meta"]
    if bad:
        raise ValueError(f"bitsandbytes quantizes float32 / bfloat16 / float16 weights that hold values; these do "
                         f"not: {bad}. Load the model with real weights in one of those dtypes.")


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, *, block_size: int, double_quant: bool,
               compute_dtype: torch.dtype | None, source_cls: type[nn.Module] = nn.Linear,
               quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4) holding ``weight`` (out, in) quantized as transformers does it.

    The steps are transformers' ``Bnb4bitQuantize``: a ``Params4bit`` of the (out, in) weight moved to
    its device, which runs ``bitsandbytes.functional.quantize_4bit`` over its row-major flattening.
    ``bias`` is kept as given (the same Parameter, so a caller's model is not touched).
    """
    bnb = import_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage,
                              device="meta")  # no random init of a weight that is replaced at once
    layer.weight = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=block_size,
                                     compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage,
                                     module=layer).to(weight.device)
    layer.bias = bias
    layer.source_cls = source_cls  # as transformers records it: a Conv1D source merges back into a Conv1D
    # bitsandbytes' AVX512-BF16 CPU repack (eval, no grad) rounds absmax to bfloat16 in place, and its kernel has
    # no autograd: a training step after an eval pass would lose the gradient through this layer's input.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_base(model: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32,
                  target_modules: TargetModules | None = None) -> nn.Module:
    """Replaces the base's linear layers with bitsandbytes ``Linear4bit`` (NF4), in place; returns ``model``.

    The layers are those transformers' 4-bit loading replaces: every ``Conv1D`` and plain ``nn.Linear``
    but the output layer, tied weights and the module of the last parameter (GPT-2: the four
    ``Conv1D`` of each block; ``lm_head``, embeddings and LayerNorms stay dense). A ``Conv1D`` weight
    (in, out) is transposed to the (out, in) that ``Linear4bit`` holds. With the defaults the codes,
    absmax codes, nested absmax and offset equal byte for byte those of
    ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))``.

    One difference from transformers' layers, in how they run, not in their bytes: bitsandbytes'
    AVX512-BF16 CPU repacking is off (``linear4bit``), so eval and training compute the same weight and
    gradients always flow. Every check runs first, so an error leaves ``model`` unchanged.

    Args:
        model: a full-precision model without LoRA (modified in place).
        block_size: values per absmax block, one of ``BLOCK_SIZES`` (64 is QLoRA's and transformers').
        double_quant: quantize the absmax values too (8-bit, blocks of 256, minus their mean): QLoRA's
            double quantization, ``bnb_4bit_use_double_quant``.
        compute_dtype: the dtype ``Linear4bit`` computes in (``bnb_4bit_compute_dtype``).
        target_modules: restrict to these modules (``inject_lora``'s matching rule); default all of the above.

    Returns:
        ``model``; ``model.is_loaded_in_4bit`` is set, as transformers sets it (PEFT reads it).

    Raises:
        BitsandbytesMissingError: bitsandbytes is not installed (an ImportError naming the install command).
        ValueError: a block size or compute dtype bitsandbytes does not take, a model quantized already or
            carrying LoRA, nothing to quantize, or a target transformers keeps dense.
    """
    bnb = import_bitsandbytes()
    check_quantize_settings(block_size, double_quant, compute_dtype)
    check_unquantized(model)
    chosen = select_quantized(model, target_modules)
    check_weights(chosen)
    new = {}
    for name, module in chosen:  # built aside: the model changes only once every layer is quantized
        weight = module.weight.T if isinstance(module, Conv1D) else module.weight  # (out, in)
        new[name] = linear4bit(weight, module.bias, block_size=block_size, double_quant=double_quant,
                               compute_dtype=compute_dtype, source_cls=type(module)).train(module.training)
    for name, layer in new.items():
        model.set_submodule(name, layer)
    model.is_loaded_in_4bit = True
    logger.info("quantize_base: %d layers to bitsandbytes %s Linear4bit (NF4, block %d%s): %s", len(new),
                bnb.__version__, block_size, ", double quant" if double_quant else "", ", ".join(new))
    return model


# -- the 4-bit base inside a wrapper ---------------------------------------------------------------

def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a ``Linear4bit``, as ``bitsandbytes.functional.dequantize_4bit`` returns it.

    On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first no-grad eval forward
    (absmax rounded to bfloat16); this undoes that layout on copies, with bitsandbytes' own inverse.
    """
    bnb = import_bitsandbytes()
    weight = layer.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnb.functional.dequantize_4bit(data, state)


def merged_module(wrapper: LoRAWrapper, adapter_names: list[str] | None, requantize: bool) -> nn.Module:
    """The layer that replaces a 4-bit wrapper at merge: ``dequantize(W) + s B A`` in the dequantized dtype.

    A ``Conv1D`` source gives a ``Conv1D`` (the (in, out) transpose), so ``save_pretrained`` writes the
    original architecture's layout; any other an ``nn.Linear``. With ``requantize`` the merged weight is
    quantized again into a ``Linear4bit`` with the base's settings (lossy: see docs/lora_torch.md).
    """
    base = wrapper.base_layer
    state = base.weight.quant_state
    with torch.no_grad():
        merged = wrapper.merged_weight(adapter_names).to(state.dtype)  # (out, in)
    bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    source = getattr(base, "source_cls", nn.Linear)
    if requantize:
        return linear4bit(merged, bias, block_size=state.blocksize, double_quant=bool(state.nested),
                          compute_dtype=base.compute_dtype, source_cls=source,
                          quant_storage=base.weight.quant_storage).train(base.training)
    if issubclass(source, Conv1D):
        layer = Conv1D(wrapper.out_features, wrapper.in_features)
        layer.weight = nn.Parameter(merged.T.contiguous(), requires_grad=False)
    else:
        with torch.device("meta"):
            layer = nn.Linear(wrapper.in_features, wrapper.out_features, bias=bias is not None)
        layer.weight = nn.Parameter(merged, requires_grad=False)
    layer.bias = bias
    return layer.train(base.training)


class Linear4bitWithLoRA(LinearWithLoRA):
    """A bitsandbytes ``Linear4bit`` (frozen NF4 base, weight (out, in)) with LoRA; arguments as ``LinearWithLoRA``.

    The branch's parameters are float32 (as PEFT's), on the base's device; its input is cast to them and
    its output back to the base output's dtype. ``base_weight()`` dequantizes, so merge and DoRA see
    ``dequantize_4bit(W)``. The wrapper turns off bitsandbytes' AVX512-BF16 CPU repacking of a base
    from transformers' loading too (``quantize_base``'s have it off): that repack rounds absmax to
    bfloat16 in place and its kernel has no autograd, so a training step after an eval forward would
    silently drop the gradient through the base.
    """

    def __init__(self, linear: nn.Module, rank: int = 8, lora_alpha: float = 16.0, **kwargs) -> None:
        if not is_linear4bit(linear):
            raise TypeError(f"Linear4bitWithLoRA wraps bitsandbytes.nn.Linear4bit, got {type(linear).__name__}; "
                            "use LinearWithLoRA for torch.nn.Linear.")
        linear.support_avx512bf16_for_cpu = False
        super().__init__(linear, rank, lora_alpha, **kwargs)

    @classmethod
    def branch_placement(cls, base_layer: nn.Module) -> dict[str, torch.device | torch.dtype]:
        return {"device": base_layer.weight.device, "dtype": torch.float32}

    def base_weight(self) -> torch.Tensor:
        return dequantize_weight(self.base_layer)

    def adapter_output(self, lora: LoRALayer, x: torch.Tensor) -> torch.Tensor:
        return lora(x.to(lora.lora_A.dtype)).to(x.dtype)


class Linear4bitWithDoRA(DoRAWrapper, Linear4bitWithLoRA):
    """DoRA on a bitsandbytes ``Linear4bit``: the norm is taken of ``dequantize_4bit(W) + s A B``, as PEFT does."""

    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        if not self.merge_names(adapter_names):
            return self.base_weight().float()
        return super().merged_weight(adapter_names)
