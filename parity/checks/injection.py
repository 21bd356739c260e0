"""Stage 2: both halves put LoRA on the same modules, with the same shapes and parameter count, as PEFT does.

The main config is also injected by ``peft.get_peft_model`` (``parity.peft_reference``): the module set,
each module's (rank, scaling, DoRA) and the trainable count must be PEFT's. The rules that pick them
(target matching, ``all-linear``, ``rank_pattern``/``alpha_pattern``) live in ``lora_format``, shared by
both halves, so only PEFT can tell when such a rule is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from parity.pair import ModelPair
from parity.peft_reference import peft_available, peft_model, peft_module_settings
from parity.results import EXACT, CheckResult, StageResult, compare_exact, failed
from parity.transfer import adapter_magnitudes, adapter_to_named, jax_kernel

# Why shapes agree without transposes (printed in the shape row): A (in, r) and B (r, out) in both
# halves; GPT-2's Conv1D weight and the Flax Dense kernel are both (in, out); only nn.Linear is (out, in).
ORIENTATION_NOTE = ("A (in,r), B (r,out) in both; Conv1D weight == Flax kernel (in,out); nn.Linear weight is "
                    "(out,in), compared transposed; PEFT files hold A.T (r,in), B.T (out,r)")


# Target lists longer than this are summarised in labels (per-layer names collapse to h.{i}).
_LISTED_TARGETS = 4


def injection_specs(n_layer: int, *, rank: int, alpha: float, use_rslora: bool = False,
                    use_dora: bool = False) -> list[Any]:
    """The target specs of the injection stage: three lists, a regex, and ``layers_to_transform``.

    ``use_rslora`` and ``use_dora`` apply to all five.

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
                          layers_to_transform=layers, use_dora=use_dora)

    last = sorted({0, n_layer - 1})
    return [config(["c_attn"]), config(["c_attn", "c_proj"]), config(["c_attn", "c_proj", "c_fc"]),
            config(r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)"), config(["c_attn", "c_proj"], last)]


def spec_label(config: Any) -> str:
    """A short label of a config's targets, e.g. ``c_attn,c_proj@layers=0,2`` or ``re:<regex>``.

    >>> from lora_jax import LoraConfig
    >>> spec_label(LoraConfig(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h"))
    'c_attn@layers=1@pattern=h'
    >>> spec_label(LoraConfig(target_modules="ALL-LINEAR", use_dora=True, rank_pattern={"c_fc": 2}))
    'all-linear@dora@rank_pattern=c_fc:2'
    >>> spec_label(LoraConfig(target_modules=[f"h.{i}.{m}" for i in range(2) for m in ("c_fc", "c_proj", "c_attn")]))
    'h.{i}.c_attn,h.{i}.c_fc,h.{i}.c_proj (6 names)'
    """
    from lora_format.all_linear import is_all_linear
    from lora_torch.targeting import summarize_names

    targets = config.target_modules
    if is_all_linear(targets):
        label = "all-linear"
    elif isinstance(targets, str):
        label = f"re:{targets}"
    elif len(targets) > _LISTED_TARGETS:  # e.g. the full names PEFT saves for all-linear
        label = ",".join(summarize_names(sorted(targets))) + f" ({len(targets)} names)"
    else:
        label = ",".join(targets)
    if config.layers_to_transform is not None:
        label += "@layers=" + ",".join(str(i) for i in config.layers_to_transform)
    if config.layers_pattern is not None:
        pattern = config.layers_pattern
        label += "@pattern=" + (pattern if isinstance(pattern, str) else ",".join(pattern))
    if config.use_dora:
        label += "@dora"
    for field in ("rank_pattern", "alpha_pattern"):
        if getattr(config, field):
            label += f"@{field}=" + ",".join(f"{key}:{value:g}" for key, value in getattr(config, field))
    return label


def _kernel_shape(module: Any) -> tuple[int, ...]:
    from lora_torch.quantize import is_linear4bit
    from torch import nn

    base = module.base_layer
    if is_linear4bit(base):  # its weight holds packed codes; the kernel it stands for is (in, out)
        return base.in_features, base.out_features
    shape = tuple(base.weight.shape)
    return shape[::-1] if isinstance(module.base_layer, nn.Linear) else shape


def check_injection(pair: ModelPair, config: Any, *, seed: int = 0, against_peft: bool = False) -> StageResult:
    """Injects ``config`` into a torch copy and builds the JAX adapter; compares the two.

    Rows: the set of adapted module names, the trainable parameter count (torch: every
    parameter with ``requires_grad`` after freezing; JAX: the adapter's arrays, DoRA's m included), and
    the number of modules whose (A, B, base kernel, m) shapes disagree. With ``against_peft`` (and
    ``peft`` installed), three more: module names, per-module (rank, scaling, DoRA) and trainable
    count of ``peft.get_peft_model`` against JAX's.
    """
    import jax
    from lora_jax import count_params
    from lora_torch import lora_wrappers

    label = spec_label(config)
    torch_model = pair.impl.torch_inject(pair.torch_copy(), config)
    adapter = pair.impl.jax_init_lora(pair.jax_float_params(), config, jax.random.key(seed))
    wrappers, named = lora_wrappers(torch_model), adapter_to_named(adapter)
    rows = [compare_exact("injection", f"module names [{label}]", set(wrappers), set(named))]
    trainable = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    rows.append(compare_exact("injection", f"trainable params [{label}]", trainable, count_params(adapter)))
    mismatched = []
    magnitudes = adapter_magnitudes(adapter)
    for name in sorted(set(wrappers) & set(named)):
        lora_layer = wrappers[name].lora
        torch_shapes = (tuple(lora_layer.lora_A.shape), tuple(lora_layer.lora_B.shape), _kernel_shape(wrappers[name]),
                        tuple(lora_layer.magnitude.shape) if getattr(lora_layer, "use_dora", False) else None)
        jax_shapes = (named[name][0].shape, named[name][1].shape, tuple(jax_kernel(pair.jax_float_params(), name).shape),
                      magnitudes[name].shape if name in magnitudes else None)
        if torch_shapes != jax_shapes:
            mismatched.append(f"{name}: torch {torch_shapes} vs JAX {jax_shapes}")
    shape_row = compare_exact("injection", f"modules with shape mismatch [{label}]", len(mismatched), 0)
    detail = "; ".join(mismatched[:3]) if mismatched else ORIENTATION_NOTE
    rows.append(dataclasses.replace(shape_row, detail=detail))
    if against_peft and peft_available():
        rows += peft_injection_rows(pair, adapter, label)
    return StageResult(rows)


def peft_injection_rows(pair: ModelPair, adapter: Any, label: str) -> list[CheckResult]:
    """``peft.get_peft_model`` with the adapter's config against the JAX adapter: modules, settings, count.

    The settings row counts modules whose (rank, scaling, DoRA) differ from PEFT's; its detail names the first.
    """
    from lora_jax import count_params

    names = [f"module names vs peft.get_peft_model [{label}]", f"rank, scaling, DoRA per module vs PEFT [{label}]",
             f"trainable params vs PEFT [{label}]"]
    try:
        model = peft_model(pair.reference_copy(), adapter.config)
    except Exception as error:  # PEFT refusing the config is a disagreement with it
        return [failed("injection", name, EXACT, f"PEFT reference: {type(error).__name__}: {error}") for name in names]
    theirs = peft_module_settings(model)
    ours = {".".join(path): (adapter.rank(path), adapter.scaling(path), adapter.config.use_dora)
            for path in adapter.modules()}
    differ = [f"{name}: JAX {ours[name]}, PEFT {theirs[name]}" for name in sorted(set(ours) & set(theirs))
              if ours[name][0] != theirs[name][0] or ours[name][2] != theirs[name][2]
              or abs(ours[name][1] - theirs[name][1]) > 1e-12 * abs(theirs[name][1])]
    settings = compare_exact("injection", names[1], len(differ), 0)
    detail = "; ".join(differ[:2]) if differ else f"{len(set(ours) & set(theirs))} modules as PEFT builds them"
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    return [compare_exact("injection", names[0], set(ours), set(theirs)),
            dataclasses.replace(settings, detail=detail),
            compare_exact("injection", names[2], count_params(adapter), trainable)]
