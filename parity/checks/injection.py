"""Stage 2: both halves put LoRA on the same modules, with the same shapes and parameter count."""

from __future__ import annotations

import dataclasses
from typing import Any

from parity.pair import ModelPair
from parity.results import StageResult, compare_exact
from parity.transfer import adapter_to_named, jax_kernel

# Why shapes agree without transposes (printed in the shape row): A (in, r) and B (r, out) in both
# halves; GPT-2's Conv1D weight and the Flax Dense kernel are both (in, out); only nn.Linear is (out, in).
ORIENTATION_NOTE = ("A (in,r), B (r,out) in both; Conv1D weight == Flax kernel (in,out); nn.Linear weight is "
                    "(out,in), compared transposed; PEFT files hold A.T (r,in), B.T (out,r)")


def injection_specs(n_layer: int, *, rank: int, alpha: float, use_rslora: bool = False) -> list[Any]:
    """The target specs of the injection stage: three lists, a regex, and ``layers_to_transform``.

    >>> for config in injection_specs(3, rank=4, alpha=8.0):
    ...     print(spec_label(config))
    c_attn
    c_attn,c_proj
    c_attn,c_proj,c_fc
    re:.*\\.h\\.\\d+\\.(attn\\.c_attn|mlp\\.c_fc)
    c_attn,c_proj@layers=0,2
    """
    from lora_jax import LoraConfig

    def config(targets: Any, layers: Any = None) -> Any:
        return LoraConfig(rank=rank, alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                          layers_to_transform=layers)

    last = sorted({0, n_layer - 1})
    return [config(["c_attn"]), config(["c_attn", "c_proj"]), config(["c_attn", "c_proj", "c_fc"]),
            config(r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)"), config(["c_attn", "c_proj"], last)]


def spec_label(config: Any) -> str:
    """A short label of a config's targets, e.g. ``c_attn,c_proj@layers=0,2`` or ``re:<regex>``.

    >>> from lora_jax import LoraConfig
    >>> spec_label(LoraConfig(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h"))
    'c_attn@layers=1@pattern=h'
    """
    targets = config.target_modules
    label = f"re:{targets}" if isinstance(targets, str) else ",".join(targets)
    if config.layers_to_transform is not None:
        label += "@layers=" + ",".join(str(i) for i in config.layers_to_transform)
    if config.layers_pattern is not None:
        pattern = config.layers_pattern
        label += "@pattern=" + (pattern if isinstance(pattern, str) else ",".join(pattern))
    return label


def _kernel_shape(module: Any) -> tuple[int, ...]:
    from torch import nn

    shape = tuple(module.base_layer.weight.shape)
    return shape[::-1] if isinstance(module.base_layer, nn.Linear) else shape


def check_injection(pair: ModelPair, config: Any, *, seed: int = 0) -> StageResult:
    """Injects ``config`` into a torch copy and builds the JAX adapter; compares the two.

    Rows: the set of adapted module names, the trainable parameter count (torch: every
    parameter with ``requires_grad`` after freezing; JAX: the adapter's arrays), and the number of
    modules whose (A, B, base kernel) shapes disagree.
    """
    import jax
    from lora_jax import count_params
    from lora_torch import lora_wrappers

    label = spec_label(config)
    torch_model = pair.impl.torch_inject(pair.torch_copy(), config)
    adapter = pair.impl.jax_init_lora(pair.jax_params, config, jax.random.key(seed))
    wrappers, named = lora_wrappers(torch_model), adapter_to_named(adapter)
    rows = [compare_exact("injection", f"module names [{label}]", set(wrappers), set(named))]
    trainable = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    rows.append(compare_exact("injection", f"trainable params [{label}]", trainable, count_params(adapter)))
    mismatched = []
    for name in sorted(set(wrappers) & set(named)):
        lora_layer = wrappers[name].lora
        torch_shapes = (tuple(lora_layer.lora_A.shape), tuple(lora_layer.lora_B.shape), _kernel_shape(wrappers[name]))
        jax_shapes = (named[name][0].shape, named[name][1].shape, tuple(jax_kernel(pair.jax_params, name).shape))
        if torch_shapes != jax_shapes:
            mismatched.append(f"{name}: torch {torch_shapes} vs JAX {jax_shapes}")
    shape_row = compare_exact("injection", f"modules with shape mismatch [{label}]", len(mismatched), 0)
    detail = "; ".join(mismatched[:3]) if mismatched else ORIENTATION_NOTE
    rows.append(dataclasses.replace(shape_row, detail=detail))
    return StageResult(rows)
