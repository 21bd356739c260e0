"""Runs the checks in order on one pair and gathers a :class:`parity.report.ParityReport`.

Each stage is guarded: an exception inside a check (a shape error from a broken merge,
modules that differ so values cannot be copied) becomes a failed row naming the error,
and the next stage still runs.

Every stage but base_forward also holds JAX to PEFT itself (``parity.peft_reference``) when ``peft``
is installed: the variants' rules (DoRA, LoRA+, all-linear, rank/alpha patterns) sit in shared code
or in both halves, where a JAX-against-torch comparison cannot see them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.adapted import AdaptedPair, adapt
from parity.checks.base_forward import check_base_forward
from parity.checks.deltas import check_forward_delta
from parity.checks.gradients import check_gradients
from parity.checks.injection import check_injection, injection_specs
from parity.checks.interchange import check_interchange
from parity.checks.many_adapters import (
    MULTI_CHECKS,
    check_combination,
    check_mixed_batch,
    check_switching,
    load_many,
)
from parity.checks.merge import check_merge
from parity.checks.qlora_merge import check_qlora_merge
from parity.checks.quantization import check_quantization
from parity.checks.training import check_training, default_settings
from parity.environment import describe_environment
from parity.numerics import parity_numerics
from parity.pair import ModelPair, make_batches
from parity.report import ParityReport
from parity.results import EXACT, StageResult, failed

CHECKS = ("base_forward", "injection", "forward_delta", "gradients", "training", "merge", "interchange")
# With a 4-bit base (``quantize``) the quantization stage runs first (``parity.checks.quantization``).
QUANTIZED_CHECKS = ("quantization", *CHECKS)


def default_checks(quantize: str | None) -> tuple[str, ...]:
    """Every stage that applies: :data:`QUANTIZED_CHECKS` with a 4-bit base, else :data:`CHECKS`.

    >>> default_checks("nf4")[:2]
    ('quantization', 'base_forward')
    """
    return CHECKS if quantize is None else QUANTIZED_CHECKS


@dataclass(frozen=True, kw_only=True)
class SuiteSettings:
    """What the suite runs.

    Attributes:
        targets: LoRA target modules (list -> names, str -> regex, ``"all-linear"`` -> PEFT's every linear
            layer but the output head) for stages 3-7.
        rank: LoRA rank (> 1 by default: at r = 1, alpha and alpha/r coincide and a scaling bug hides).
        alpha: LoRA alpha.
        use_rslora: rsLoRA scaling; the delta stage runs with both settings anyway.
        layers_to_transform: Optional layer indices.
        use_dora: DoRA: every module also learns a magnitude per output feature (drawn off its norm).
        rank_pattern: PEFT's per-module ranks ``{regex: rank}`` (Python API only).
        alpha_pattern: PEFT's per-module alphas ``{regex: alpha}`` (Python API only).
        loraplus_ratio: LoRA+ in the training stage: B's learning rate is ``ratio`` times A's.
        adapter: A PEFT adapter directory to use instead of random A and B (its config wins).
        steps: AdamW steps of the training stage.
        batch_size: Sequences per batch.
        seq_len: Tokens per sequence.
        seed: Seeds the batches, A and B.
        checks: Which stages to run, in :data:`QUANTIZED_CHECKS` order; None (the default) for every stage
            that applies (:func:`default_checks`).
        workdir: Where the interchange stage writes its temporary adapters (default: system temp).
        adapters: Named PEFT adapters ``((name, dir), ...)``; with two or more, the stages of
            :data:`parity.checks.many_adapters.MULTI_CHECKS` run after the others (which use ``adapter``).
        combine_weights: The weights of the combination stage, one per adapter (default: equal, 1/K each).
        quantize: None, or ``"nf4"`` when the pair holds a QLoRA base (``load_pair(quantize="nf4")``); it adds
            the quantization stage and runs the merge stage as a QLoRA merge (``parity.checks.qlora_merge``).
    """

    targets: tuple[str, ...] | str = ("c_attn", "c_proj")
    rank: int = 4
    alpha: float = 8.0
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    use_dora: bool = False
    rank_pattern: Any = ()
    alpha_pattern: Any = ()
    loraplus_ratio: float | None = None
    adapter: str | os.PathLike | None = None
    steps: int = 10
    batch_size: int = 2
    seq_len: int = 16
    seed: int = 0
    checks: tuple[str, ...] | None = None
    workdir: str | os.PathLike | None = None
    adapters: tuple[tuple[str, str], ...] = ()
    combine_weights: tuple[float, ...] | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"quantize={self.quantize!r} is not supported; use None or 'nf4'.")
        if self.checks is None:  # a frozen dataclass fills its own default once, here
            object.__setattr__(self, "checks", default_checks(self.quantize))
        choices = default_checks(self.quantize)
        unknown = [c for c in self.checks if c not in choices]
        if "quantization" in unknown:
            raise ValueError("The quantization stage compares 4-bit bases; add --quantize nf4, or leave quantization "
                             "out of --checks.")
        if unknown or not self.checks:
            raise ValueError(f"Unknown or no checks {unknown or list(self.checks)}; choose from {', '.join(choices)}.")
        default_settings(self.steps, self.loraplus_ratio)  # validates steps and the ratio before any model work

    def lora_config(self) -> Any:
        """The ``lora_jax.LoraConfig`` of stages 3-7 (validated by ``LoraConfig`` itself)."""
        from lora_jax import LoraConfig

        return LoraConfig(rank=self.rank, alpha=self.alpha, target_modules=self.targets,
                          use_rslora=self.use_rslora, layers_to_transform=self.layers_to_transform,
                          use_dora=self.use_dora, rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern)

    def describe(self) -> dict:
        """The run settings as a flat dict for reports (the LoRA ones come from :func:`describe_lora`)."""
        skipped = {"workdir", "adapters", "targets", "rank", "alpha", "use_rslora", "layers_to_transform", "use_dora",
                   "rank_pattern", "alpha_pattern"}
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name not in skipped}
        out["checks"] = ",".join(self.checks)
        if self.adapters:
            out["adapters"] = ",".join(f"{name}={path}" for name, path in self.adapters)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items() if v is not None}


def describe_lora(config: Any) -> dict:
    """The effective LoRA settings of a run (from the flags, or from ``--adapter``'s config)."""
    targets = config.target_modules
    out = {"targets": targets if isinstance(targets, str) else ",".join(targets), "rank": config.rank,
           "alpha": config.alpha, "use_rslora": config.use_rslora, "scaling": round(config.scaling, 6)}
    if config.use_dora:
        out["use_dora"] = True
    if config.layers_to_transform is not None:
        out["layers_to_transform"] = ",".join(str(i) for i in config.layers_to_transform)
    if config.layers_pattern is not None:
        pattern = config.layers_pattern
        out["layers_pattern"] = pattern if isinstance(pattern, str) else ",".join(pattern)
    for field in ("rank_pattern", "alpha_pattern"):  # per-module ranks/alphas; "scaling" is then the default's
        if getattr(config, field):
            out[field] = ",".join(f"{key}={value:g}" for key, value in getattr(config, field))
    return out


def _guarded(stage: str, run: Callable[[], StageResult]) -> StageResult:
    try:
        return run()
    except Exception as error:  # a crash in a check is a failed check, reported, not a traceback
        return StageResult([failed(stage, "stage raised", EXACT, f"{type(error).__name__}: {error}")])


class _Stages:
    """The shared inputs of one suite run, built lazily (the adapted pair only when a stage needs it)."""

    def __init__(self, pair: ModelPair, settings: SuiteSettings) -> None:
        self.pair, self.settings = pair, settings
        self.input_ids = make_batches(pair, count=1, batch_size=settings.batch_size, seq_len=settings.seq_len,
                                      seed=settings.seed)[0]
        self._adapted: dict[bool | None, AdaptedPair] = {}

    def adapted(self, use_rslora: bool | None = None) -> AdaptedPair:
        """The pair adapted with the suite's config; ``use_rslora`` flips only the scaling, same A and B."""
        if None not in self._adapted:
            source = self.config if self.given_adapter is None else self.given_adapter
            self._adapted[None] = adapt(self.pair, source, seed=self.settings.seed)
        main = self._adapted[None]
        if use_rslora is None or use_rslora == main.config.use_rslora:
            return main
        if use_rslora not in self._adapted:
            # The same arrays in a new Adapter whose config says rsLoRA: the scale changes openly, with the config.
            flipped = dataclasses.replace(main.config, use_rslora=use_rslora)
            self._adapted[use_rslora] = adapt(self.pair, dataclasses.replace(main.adapter, config=flipped))
        return self._adapted[use_rslora]

    @property
    def config(self) -> Any:
        """The effective ``LoraConfig`` of stages 3-7: the ``--adapter``'s own, else the settings'."""
        return self.settings.lora_config() if self.given_adapter is None else self.given_adapter.config

    @functools.cached_property
    def given_adapter(self) -> Any:
        """The ``--adapter`` as a ``lora_jax.Adapter`` (None without one), with dropout 0.

        Cached: the adapter is read from disk once per run, not once per stage.
        """
        if self.settings.adapter is None:
            return None
        adapter = self.pair.impl.jax_load_adapter(Path(self.settings.adapter), self.pair.jax_float_params())
        # Dropout masks cannot match across frameworks; parity compares the deterministic function.
        return dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, dropout=0.0))

    def run(self, name: str) -> StageResult:
        return getattr(self, f"_{name}")()

    def _quantization(self) -> StageResult:
        return check_quantization(self.pair)

    def _base_forward(self) -> StageResult:
        return check_base_forward(self.pair, self.input_ids)

    def _injection(self) -> StageResult:
        s = self.settings
        main = self.config
        specs = injection_specs(self.pair.hf_config["n_layer"], rank=s.rank, alpha=s.alpha, use_rslora=s.use_rslora,
                                use_dora=main.use_dora)
        if main not in specs:  # --targets/--adapter settings beyond the five standard specs
            specs.append(main)
        rows = []
        for config in specs:
            # The main config, the one stages 3-7 use, is also injected by PEFT itself.
            rows += _guarded("injection", lambda c=config: check_injection(
                self.pair, c, seed=s.seed, against_peft=c == main)).rows
        return StageResult(rows)

    def _forward_delta(self) -> StageResult:
        results = {}
        for flag in (False, True):
            adapted = self.adapted(flag)
            config = adapted.config
            varied = " for modules no pattern names" if config.rank_pattern or config.alpha_pattern else ""
            label = f"rsLoRA {'on' if flag else 'off'}, s={config.scaling:g}{varied}"
            results[flag] = check_forward_delta(adapted, self.input_ids, label)
        main = results[self.adapted().config.use_rslora]
        # Both runs share A and B (only the scaling differs), so the B row is kept once.
        return StageResult(results[False].rows + results[True].rows[1:], main.arrays)

    def _gradients(self) -> StageResult:
        return check_gradients(self.adapted(), self.input_ids)

    def _training(self) -> StageResult:
        s = self.settings
        # Two batches, cycled: the loss then visibly falls (memorisation), which random tokens alone do not show.
        distinct = make_batches(self.pair, count=2, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed + 1)
        batches = [distinct[i % 2] for i in range(s.steps)]
        return check_training(self.adapted(), batches, default_settings(s.steps, s.loraplus_ratio))

    def _merge(self) -> StageResult:
        if self.pair.quantize is not None:  # merging a 4-bit base dequantizes it (and PEFT's re-quantizes)
            return check_qlora_merge(self.adapted(), self.input_ids)
        return check_merge(self.adapted(), self.input_ids)

    def _interchange(self) -> StageResult:
        return check_interchange(self.adapted(), self.input_ids, self.settings.workdir)

    @functools.cached_property
    def many(self) -> Any:
        """The ``--adapter NAME=DIR`` adapters in both halves (``parity.checks.many_adapters.ManyAdapters``)."""
        return load_many(self.pair, self.settings.adapters)

    @functools.cached_property
    def mixed_input_ids(self) -> Any:
        """A batch of at least K + 1 rows, so every adapter and the base appear in it."""
        s = self.settings
        rows = max(s.batch_size, len(s.adapters) + 1)
        return make_batches(self.pair, count=1, batch_size=rows, seq_len=s.seq_len, seed=s.seed + 3)[0]

    def _switching(self) -> StageResult:
        return check_switching(self.many, self.input_ids)

    def _mixed_batch(self) -> StageResult:
        return check_mixed_batch(self.many, self.mixed_input_ids)

    def _combination(self) -> StageResult:
        s = self.settings
        weights = s.combine_weights or tuple(1.0 / len(s.adapters) for _ in s.adapters)
        return check_combination(self.many, self.input_ids, weights)


def run_check(pair: ModelPair, name: str, settings: SuiteSettings | None = None) -> StageResult:
    """Runs one stage (see :data:`CHECKS`) with parity numerics on; exceptions propagate.

    Raises:
        ValueError: ``name`` is not a known check (``quantization`` needs a 4-bit pair).
    """
    choices = default_checks(pair.quantize)
    if name not in choices:
        raise ValueError(f"Unknown check {name!r}; choose from {', '.join(choices)}.")
    settings = settings or SuiteSettings()
    with parity_numerics():
        return _Stages(pair, settings).run(name)


def run_suite(pair: ModelPair, settings: SuiteSettings | None = None, *, command: str | None = None) -> ParityReport:
    """Runs every stage in ``settings.checks`` and returns the report (arrays attached for ``--dump``)."""
    settings = settings or SuiteSettings()
    rows, arrays = [], {}
    with parity_numerics():
        stages = _Stages(pair, settings)
        arrays["input_ids"] = stages.input_ids
        for name in QUANTIZED_CHECKS:
            if name in settings.checks:
                result = _guarded(name, lambda n=name: stages.run(n))
                rows += result.rows
                arrays.update(result.arrays)
        if len(settings.adapters) >= 2:
            for name in MULTI_CHECKS:
                result = _guarded(name, lambda n=name: stages.run(n))
                rows += result.rows
                arrays.update(result.arrays)
    environment = describe_environment(pair.placement.name, pair.placement.description, pair.dtype)
    try:
        lora_settings = describe_lora(stages.config)
    except Exception as error:  # the stages already reported it as failed rows
        lora_settings = {"lora": f"unavailable ({type(error).__name__})"}
    described = {"model": str(pair.model_dir), **lora_settings, **settings.describe()}
    return ParityReport(rows=tuple(rows), environment=environment, settings=described, command=command,
                        arrays=arrays)
