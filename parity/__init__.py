"""parity: one GPT-2 checkpoint into both halves, every stage checked number by number.

Load a checkpoint into transformers + ``lora_torch`` and into the Flax GPT-2 + ``lora_jax``,
run the seven checks (base forward, injection, forward deltas, gradients, training, merge,
adapter interchange), and get one row per comparison: max abs and rel error, tolerance,
pass/fail. Stages 2-7 also hold JAX to ``peft`` itself (``parity.peft_reference``), so a rule both
halves share cannot pass by agreeing with itself. The variants run through every stage: DoRA
(``use_dora``), LoRA+ (``loraplus_ratio``), ``targets="all-linear"``, rank/alpha patterns.
``python -m parity`` is the command-line front end.

Example (the Python API; the model directory is any GPT-2 ``save_pretrained`` output)::

    from parity import load_pair, run_suite, SuiteSettings, render_table
    pair = load_pair("path/to/gpt2_dir")              # or None: the embedded base
    report = run_suite(pair, SuiteSettings(targets=("c_attn",), rank=8, alpha=16.0))
    print(render_table(report)); assert report.passed
    run_suite(pair, SuiteSettings(targets="all-linear", use_dora=True, loraplus_ratio=16.0))

    from parity import run_check
    rows = run_check(pair, "merge").rows              # one stage only

To plant a bug, replace one implementation function: ``pair.with_impl(torch_merge=broken)``.
"""

from parity.adapted import AdaptedPair, adapt
from parity.implementations import Implementations
from parity.optimizers import TrainSettings
from parity.pair import ModelPair, load_pair, make_batches
from parity.report import ParityReport, render_json, render_markdown, render_table
from parity.results import CheckResult, StageResult, Tolerance
from parity.suite import CHECKS, SuiteSettings, run_check, run_suite
from parity.tolerances import tolerance_for

__all__ = [
    "CHECKS",
    "AdaptedPair",
    "CheckResult",
    "Implementations",
    "ModelPair",
    "ParityReport",
    "StageResult",
    "SuiteSettings",
    "Tolerance",
    "TrainSettings",
    "adapt",
    "load_pair",
    "make_batches",
    "render_json",
    "render_markdown",
    "render_table",
    "run_check",
    "run_suite",
    "tolerance_for",
]
