"""LoRA for PyTorch and transformers' GPT-2, in the classic tutorial's design, with its mistakes fixed.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> model = freeze_base_model(inject_lora(model, ["0", "2"], rank=2, lora_alpha=4.0, verbose=False))
>>> print_trainable_parameters(model)["trainable"]
trainable params: 44 || all params: 102 || trainable%: 43.1373
44
"""

from lora_torch.adapters import active_adapters, adapter_names, delete_adapter, disable_adapters, set_adapter
from lora_torch.dora import Conv1DWithDoRA, DoRALayer, LinearWithDoRA
from lora_torch.embedding import EmbeddingLoRALayer, EmbeddingWithLoRA
from lora_torch.inject import (
    adapter_layers,
    add_adapter,
    find_target_modules,
    inject_lora,
    list_adapters,
    lora_module_names,
    lora_wrappers,
)
from lora_torch.layers import Conv1DWithLoRA, LinearWithLoRA, LoRALayer, LoRAWrapper, lora_scaling
from lora_torch.loraplus import create_loraplus_param_groups
from lora_torch.lora_weights import load_lora_weights, save_lora_weights
from lora_torch.merge import merge_lora_weights, unmerge_lora_weights
from lora_torch.mixed_batch import BASE_ADAPTER
from lora_torch.peft_adapter import load_adapter, peft_state_dict, save_adapter
from lora_torch.peft_config import build_adapter_config
from lora_torch.quantize import (
    BitsandbytesMissingError,
    Linear4bitWithDoRA,
    Linear4bitWithLoRA,
    quantize_base,
)
from lora_torch.trainable import (
    freeze_base_model,
    lora_parameters,
    print_trainable_parameters,
    unfreeze_lora_parameters,
)
from lora_torch.weighted import add_weighted_adapter

__all__ = [
    "BASE_ADAPTER",
    "BitsandbytesMissingError",
    "Conv1DWithDoRA",
    "Conv1DWithLoRA",
    "DoRALayer",
    "EmbeddingLoRALayer",
    "EmbeddingWithLoRA",
    "Linear4bitWithDoRA",
    "Linear4bitWithLoRA",
    "LinearWithDoRA",
    "LinearWithLoRA",
    "LoRALayer",
    "LoRAWrapper",
    "active_adapters",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "build_adapter_config",
    "create_loraplus_param_groups",
    "delete_adapter",
    "disable_adapters",
    "find_target_modules",
    "freeze_base_model",
    "inject_lora",
    "list_adapters",
    "load_adapter",
    "load_lora_weights",
    "lora_module_names",
    "lora_parameters",
    "lora_scaling",
    "lora_wrappers",
    "merge_lora_weights",
    "peft_state_dict",
    "print_trainable_parameters",
    "quantize_base",
    "save_adapter",
    "save_lora_weights",
    "set_adapter",
    "unfreeze_lora_parameters",
    "unmerge_lora_weights",
]
