"""The one table of PEFT's ``adapter_config.json`` fields, and the reader both halves use.

Every field of PEFT 0.21's ``peft.LoraConfig`` (inherited ones included) is in ``FIELDS`` as one of:

- ``SUPPORTED``: read and used (rank, alpha, targets...);
- ``IGNORED``: does not change what a loaded adapter computes (task type, base model name...);
- ``REFUSED``: a feature neither half implements; accepted only at one of its ``neutral`` values,
  which are the values PEFT treats as "off". Anything else would load as plain LoRA and give
  wrong outputs silently, so ``read_adapter_config`` raises, with each rule's ``reason``.

Neutral values compare by type as well as value: JSON ``1`` is not ``true``, and ``{}`` is not
``null`` (PEFT turns ``"kasa_config": {}`` into a ``KasaConfig`` with defaults, which turns KaSA on).

Keys that are not PEFT fields are ignored with a logged warning, as PEFT does.

Example:
    >>> fields = read_adapter_config(
    ...     {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": False},
    ...     "adapter_config.json")
    >>> fields.rank, fields.alpha, fields.target_modules
    (4, 8.0, ('c_attn',))
    >>> read_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
    ...                      "rank_pattern": {"c_fc": 6}, "alpha_pattern": {"c_fc": 3}}, "a.json").alpha_pattern
    (('c_fc', 3.0),)
    >>> FIELDS["modules_to_save"].kind is Kind.REFUSED, FIELDS["modules_to_save"].neutral
    (True, (None, []))
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

from lora_format.all_linear import ALL_LINEAR, is_all_linear
from lora_format.patterns import Pattern, normalise_pattern

_log = logging.getLogger(__name__)


class Kind(enum.Enum):
    """How a reader treats a field of ``adapter_config.json``."""

    SUPPORTED = "supported"
    IGNORED = "ignored"
    REFUSED = "refused"


@dataclasses.dataclass(frozen=True, slots=True)
class FieldRule:
    """One field's rule: its ``kind``, the values that mean "off" (``REFUSED`` only), and why."""

    kind: Kind
    neutral: tuple[Any, ...] = ()
    reason: str = ""


def _supported(reason: str) -> FieldRule:
    return FieldRule(Kind.SUPPORTED, reason=reason)


def _ignored(reason: str) -> FieldRule:
    return FieldRule(Kind.IGNORED, reason=reason)


def _refused(neutral: tuple[Any, ...], reason: str) -> FieldRule:
    return FieldRule(Kind.REFUSED, neutral, reason)


# Init methods whose adapter only fits a base model that the init itself changed: PiSSA, OLoRA, CorDA and
# LoRA-GA subtract the initial s * B A from W0, LoftQ quantizes W0. PEFT redoes that on load, so such an
# adapter is right only on its own residual base. save_pretrained(path_initial_model_for_weight_conversion=...)
# turns it into plain LoRA (rank 2r) and writes init_lora_weights=true.
_FRESH_INIT_ONLY = (True, False, "gaussian", "orthogonal", "eva", "mica")

FIELDS: Mapping[str, FieldRule] = MappingProxyType({
    # Inherited from PeftConfigMixin / PeftConfig.
    "peft_type": _supported("must be 'LORA'"),
    "task_type": _ignored("picks the PeftModel class; the tensor keys and the math are the same for every task"),
    "auto_mapping": _ignored("names the base model class for PEFT's auto classes"),
    "peft_version": _ignored("the PEFT version that wrote the file"),
    "base_model_name_or_path": _ignored("the caller supplies the base model"),
    "revision": _ignored("the base model's hub revision; the caller supplies the base model"),
    "inference_mode": _ignored("only decides whether the LoRA weights are trainable after loading"),
    # LoraConfig.
    "r": _supported("the rank; required"),
    "lora_alpha": _supported("the scale numerator; required"),
    "lora_dropout": _supported("dropout on the LoRA branch input"),
    "target_modules": _supported("which modules get LoRA; required"),
    "use_rslora": _supported("scale by alpha / sqrt(r) instead of alpha / r"),
    "layers_to_transform": _supported("restricts suffix-matched targets to these layer indices"),
    "layers_pattern": _supported("the name of the layer list layers_to_transform indexes"),
    "fan_in_fan_out": _supported("the base weight's orientation; the saved A and B layouts do not depend on it"),
    "exclude_modules": _refused((None, [], ""), "removes modules from the targets; the exclusion is not implemented"),
    "bias": _refused(("none", None), "'all' / 'lora_only' train base-layer biases and save them in the adapter"),
    "modules_to_save": _refused((None, []), "saves whole trained copies of extra modules (e.g. a classifier head)"),
    "init_lora_weights": _refused(
        _FRESH_INIT_ONLY,
        "PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial adapter from the base weights and LoftQ quantizes them, "
        "so the adapter only fits that changed base; convert it to plain LoRA with PEFT's save_pretrained("
        "path_initial_model_for_weight_conversion=...)",
    ),
    "rank_pattern": _supported("per-module ranks: the first key (a regex, see lora_format.patterns) matching a "
                               "module gives its rank"),
    "alpha_pattern": _supported("per-module lora_alpha values, matched like rank_pattern"),
    "megatron_config": _refused((None, {}), "builds Megatron tensor-parallel LoRA layers"),
    "megatron_core": _ignored("the Megatron module name; only read when megatron_config (refused) is set"),
    "trainable_token_indices": _refused((None, [], {}), "trains and saves selected rows of the token embedding"),
    # Read only when init_lora_weights names their method; PEFT itself drops loftq_config otherwise. A PiSSA/
    # CorDA/LoRA-GA adapter converted to plain LoRA keeps its sub-config, so refusing these would refuse it.
    "loftq_config": _ignored("LoftQ init settings; loftq is refused through init_lora_weights"),
    "eva_config": _ignored("EVA init settings; EVA only sets the initial A, which the saved weights replace"),
    "corda_config": _ignored("CorDA init settings; corda is refused through init_lora_weights"),
    "lora_ga_config": _ignored("LoRA-GA init settings; lora_ga is refused through init_lora_weights"),
    "use_dora": _supported("DoRA: a learned magnitude per output feature rescales W0 + s B A by its detached column "
                           "norm; saved as lora_magnitude_vector"),
    "velora_config": _refused((None,), "VeLoRA replaces the A projection's backward pass (compressed activations)"),
    "alora_invocation_tokens": _refused(
        (None,), "aLoRA applies the adapter only from the invocation tokens on; a plain load applies it everywhere"),
    "use_qalora": _refused((False, None), "QALoRA pools the LoRA input in groups for GPTQ-quantized layers"),
    "qalora_group_size": _ignored("QALoRA's pooling group; only read when use_qalora (refused) is set"),
    "monteclora_config": _refused((None,), "MonteCLoRA adds learned Monte Carlo perturbations to the LoRA weights"),
    "layer_replication": _refused((None, []), "stacks copies of base layers, each with its own adapter"),
    "runtime_config": _ignored("runtime-only settings; PEFT does not even save them"),
    "lora_bias": _refused((False, None), "adds a trained bias to lora_B"),
    "target_parameters": _refused((None, []), "puts LoRA on raw nn.Parameters (e.g. MoE experts), not modules"),
    "use_bdlora": _refused((None,), "BD-LoRA makes lora_A or lora_B block-diagonal"),
    "arrow_config": _refused((None,), "Arrow routes each token among several LoRA experts"),
    "kasa_config": _refused((None,), "KaSA truncates the base weight's SVD and puts learned singular values between A and B"),
    "ensure_weight_tying": _refused((False, None), "also adapts the layers tied to a target (e.g. lm_head and wte)"),
})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdapterFields:
    """The normalised values of an ``adapter_config.json`` that both halves use.

    Attributes:
        rank: ``r``, an int > 0.
        alpha: ``lora_alpha`` as a float, finite and > 0.
        dropout: ``lora_dropout``, in [0, 1); 0.0 when absent.
        use_rslora: scale by ``alpha / sqrt(rank)``; False when absent.
        target_modules: a tuple of names (suffix match), one regex string (fullmatch), or
            ``lora_format.all_linear.ALL_LINEAR`` for PEFT's ``"all-linear"`` (in any case).
        layers_to_transform: a tuple of layer indices, or None for every layer.
        layers_pattern: the layer-list name(s), or None.
        fan_in_fan_out: PEFT's flag for (in, out) base weights; False when absent.
        use_dora: DoRA (a magnitude vector per adapted module); False when absent or null.
        rank_pattern: ``(regex, rank)`` pairs in the file's order; ``()`` when absent, null or ``{}``.
            ``lora_format.patterns.module_rank_alpha`` applies them.
        alpha_pattern: ``(regex, alpha)`` pairs in the file's order, alphas as floats.
        raw: a read-only copy of the whole dict, for fields a caller passed as ``supported``.
    """

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | str | None
    fan_in_fan_out: bool
    use_dora: bool = False
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()
    raw: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)


def is_neutral(rule: FieldRule, value: Any) -> bool:
    """Whether ``value`` is one of ``rule``'s neutral values, compared by type and value.

    >>> is_neutral(FIELDS["lora_bias"], False), is_neutral(FIELDS["lora_bias"], 0)
    (True, False)
    """
    return any(type(value) is type(neutral) and value == neutral for neutral in rule.neutral)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `r: true` is a typo, not rank 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_refused(meta: Mapping[str, Any], source: str, supported: Collection[str]) -> None:
    offending = [
        (name, rule) for name, rule in FIELDS.items()
        if rule.kind is Kind.REFUSED and name not in supported and name in meta and not is_neutral(rule, meta[name])
    ]
    if not offending:
        return
    lines = "\n".join(
        f"  - {name}={_short(meta[name])}: {rule.reason} (plain LoRA has {' or '.join(map(repr, rule.neutral))})"
        for name, rule in offending
    )
    raise ValueError(
        f"{source} uses PEFT features that lora_jax and lora_torch do not implement; loading it as plain LoRA "
        f"would give wrong outputs:\n{lines}\nLoad it with peft.PeftModel.from_pretrained instead, or re-create "
        "it as plain LoRA with these fields at their plain values."
    )


def _require(meta: Mapping[str, Any], name: str, source: str, why: str) -> Any:
    if meta.get(name) is None:
        raise ValueError(f"{source} has no {name!r}. {why}")
    return meta[name]


def _targets(value: Any, source: str) -> tuple[str, ...] | str:
    if is_all_linear(value):
        return ALL_LINEAR  # each half expands it (lora_format.all_linear)
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{source}: target_modules {value!r} is a single string, so a regex, and it does not "
                             f"compile ({err}); use a list of names for exact/suffix matching.") from None
        return value
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{source}: target_modules must be a regex string or a non-empty list of module names, "
                         f"got {_short(value)}.")
    return tuple(value)


def _layers(value: Any, source: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    layers = [value] if _is_int(value) else value
    if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
        raise ValueError(f"{source}: layers_to_transform must be null, an int >= 0 or a non-empty list of them, "
                         f"got {_short(value)}.")
    return tuple(layers)


def _pattern(value: Any, source: str) -> tuple[str, ...] | str | None:
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None  # PEFT treats all three as "no pattern"
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f'{source}: layers_pattern must be None, a layer-list name ("h" for GPT-2) or a list of '
                         f"them, got {_short(value)}.")
    return tuple(value)


def _read_numbers(meta: Mapping[str, Any], source: str) -> tuple[int, float, float]:
    rank = _require(meta, "r", source, "PEFT would assume r=8, which silently rescales an adapter trained with "
                    "another rank; add the rank it was trained with (the first dimension of each lora_A.weight).")
    alpha = _require(meta, "lora_alpha", source, "PEFT would assume lora_alpha=8, and the scaling is lora_alpha / r; "
                     "add the lora_alpha the adapter was trained with.")
    if not _is_int(rank) or rank <= 0:
        raise ValueError(f"{source}: r must be a positive int, got {_short(rank)}; typical ranks are 4 to 64.")
    # json.loads reads Infinity and NaN, which would make every output inf or nan.
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{source}: lora_alpha must be a finite number > 0, got {_short(alpha)}; "
                         "a common choice is 2 * r.")
    dropout = meta.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{source}: lora_dropout must be a number in [0, 1), got {_short(dropout)}.")
    return rank, float(alpha), float(dropout)


def _read_flag(meta: Mapping[str, Any], name: str, source: str) -> bool:
    value = meta.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {name} must be true or false, got {_short(value)}.")
    return value


def _patterns(meta: Mapping[str, Any], source: str) -> tuple[Pattern, Pattern]:
    try:
        return (normalise_pattern(meta.get("rank_pattern"), "rank_pattern", integer=True),
                normalise_pattern(meta.get("alpha_pattern"), "alpha_pattern", integer=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def read_adapter_config(meta: Any, source: str, *, supported: Collection[str] = ()) -> AdapterFields:
    """Checks an ``adapter_config.json`` dict against ``FIELDS`` and returns its normalised values.

    Args:
        meta: the parsed JSON.
        source: the file it came from; every message names it.
        supported: extra field names the caller reads itself from ``AdapterFields.raw``: a ``REFUSED``
            feature it implements, or a key of its own. They are neither refused nor warned about.

    Returns:
        The ``AdapterFields``.

    Raises:
        ValueError: not a JSON object or not ``peft_type: "LORA"``; refused fields at non-neutral values
            (all of them, in one message with the reasons); a missing ``r``, ``lora_alpha`` or
            ``target_modules``; a field of the wrong type or out of range.

    >>> try:
    ...     read_adapter_config({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
    ...                          "lora_bias": True, "modules_to_save": ["lm_head"]}, "a.json")
    ... except ValueError as err:
    ...     for line in str(err).splitlines()[1:3]:
    ...         print(line)
      - modules_to_save=['lm_head']: saves whole trained copies of extra modules (e.g. a classifier head) (plain LoRA has None or [])
      - lora_bias=True: adds a trained bias to lora_B (plain LoRA has False or None)
    """
    if not isinstance(meta, Mapping):
        raise ValueError(f"{source} must hold a JSON object, got {type(meta).__name__}; is it an adapter_config.json?")
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"{source} has peft_type {meta.get('peft_type')!r}; only 'LORA' adapters load here.")
    unknown = sorted(str(key) for key in meta if key not in FIELDS and key not in supported)
    if unknown:
        # PEFT drops unknown keys with a warning too; a newer PEFT's field lands here until FIELDS classifies it.
        _log.warning("%s: ignoring keys that are not fields of PEFT's LoraConfig: %s", source, unknown)
    _check_refused(meta, source, supported)
    rank, alpha, dropout = _read_numbers(meta, source)
    rank_pattern, alpha_pattern = _patterns(meta, source)
    targets = _targets(_require(meta, "target_modules", source, "PEFT would pick per-architecture defaults, which "
                                "this project does not reproduce; list the adapted modules, e.g. [\"c_attn\"]."), source)
    layers = _layers(meta.get("layers_to_transform"), source)
    pattern = _pattern(meta.get("layers_pattern"), source)
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise ValueError(f"{source}: layers_to_transform / layers_pattern need target_modules to be a list of names; "
                         "PEFT refuses them with a regex string. Put the layer numbers in the regex instead.")
    if pattern is not None and layers is None:
        raise ValueError(f"{source}: layers_pattern is set without layers_to_transform; PEFT refuses that. "
                         "Set both or neither.")
    return AdapterFields(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_rslora=_read_flag(meta, "use_rslora", source),
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern=pattern,
        fan_in_fan_out=_read_flag(meta, "fan_in_fan_out", source),
        use_dora=meta.get("use_dora") is not None and _read_flag(meta, "use_dora", source),  # PEFT reads null as off
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        raw=MappingProxyType(dict(meta)),
    )
