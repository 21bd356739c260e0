"""``python -m parity``: load one GPT-2 checkpoint into both halves, run every check, report.

Exit status, the project's one contract (DESIGN.md: the same in parity, the examples and the benchmarks):

- 0: every check passed.
- 1: a numerical check failed (a row of the table says which; a check that raises is a failed row).
- 2: bad input: one line on stderr, ``python -m parity: error: ...``, naming the problem and the fix,
  no traceback. Every input is checked before any model is loaded (:mod:`parity.validation`): flags,
  output paths, the device, ``--model``'s config.json and weight header, ``--adapter``'s config and
  tensors (DoRA magnitudes included), which modules ``--targets``/``--layers`` select at ``--rank``, and
  the variant flags (``--dora`` or ``--targets all-linear`` beside ``--adapter`` or ``--layers``, a
  ``--loraplus-ratio`` that is not > 0 or has no training check to act on).
- 3: divergence: the training check's loss went non-finite (a NaN or inf), in either half.

Any other traceback is a bug in parity.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from parity.numerics import DEVICES, DTYPES
from parity.suite import CHECKS, SuiteSettings, default_checks
from parity.validation import (
    BadInput,
    check_adapter,
    check_batch_shape,
    check_device,
    check_lora_flags,
    check_model,
    check_output_paths,
    gpt2_skeleton,
)

_LORA_FLAGS = ("targets", "rank", "alpha", "rslora", "layers", "dora")
EXIT_CODES = """exit status:
  0  every check passed
  1  a numerical check failed (see the FAIL rows)
  2  bad input: one line on stderr naming the problem and the fix; found before any model is loaded
  3  divergence: non-finite training loss in either half"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs to list the flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description="Check that lora_torch (on transformers' GPT-2) and lora_jax (on the Flax GPT-2) agree, "
                    "stage by stage, on one checkpoint.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="GPT-2 checkpoint directory or hub id (default: the project's embedded base)")
    parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                        help="PEFT LoRA adapter directory to check instead of random A/B (its config sets targets, "
                             "rank, alpha, rsLoRA, layers, patterns, DoRA); repeat as NAME=DIR for several named "
                             "adapters, which adds the switching, mixed_batch and combination stages")
    parser.add_argument("--combine-weights", default=None, metavar="W1,W2,...",
                        help="weights of the combination stage, one per --adapter NAME=DIR (default: equal)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names (default c_attn,c_proj), re:REGEX for a regex, or "
                             "all-linear (PEFT's: every linear layer but the output head)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 8)")
    parser.add_argument("--rslora", action="store_true", default=None, help="rsLoRA scaling alpha/sqrt(r)")
    parser.add_argument("--layers", default=None, help="layers_to_transform, comma-separated indices")
    parser.add_argument("--dora", action="store_true", default=None,
                        help="DoRA: a learned magnitude per output feature (PEFT's use_dora)")
    parser.add_argument("--loraplus-ratio", type=float, default=None, metavar="R",
                        help="LoRA+ in the training check: B's learning rate is R times A's (the paper suggests 16)")
    parser.add_argument("--steps", type=int, default=10, help="AdamW steps of the training check (default 10)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per batch (default 2)")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches, A and B (default 0)")
    parser.add_argument("--checks", default=None,
                        help=f"comma-separated subset of {','.join(CHECKS)} (and quantization with --quantize; "
                             "default: every stage that applies)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp32 (TF32 off, highest matmul precision) or bf16 compute (looser tolerances)")
    parser.add_argument("--quantize", default=None, metavar="nf4",
                        help="QLoRA: every stage on a 4-bit NF4 base (double-quantized, bitsandbytes' rules) in both "
                             "halves, PEFT's rows on transformers' 4-bit model, and a quantization stage first; "
                             "needs bitsandbytes")
    parser.add_argument("--json", default=None, help="write the report as JSON to this file")
    parser.add_argument("--markdown", default=None, help="write the report as Markdown to this file")
    parser.add_argument("--section", default=None,
                        help="with --markdown: replace only this named section of an existing page")
    parser.add_argument("--title", default=None, help="heading of the Markdown section")
    parser.add_argument("--dump", default=None, help="write input_ids.npy and every *_logits.npy to this directory")
    return parser


def _targets(text: str) -> tuple[str, ...] | str:
    from lora_format.all_linear import ALL_LINEAR, is_all_linear

    if is_all_linear(text.strip()):
        return ALL_LINEAR
    if text.startswith("re:"):
        return text[3:]
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise BadInput(f"--targets {text!r} names no module; give e.g. c_attn,c_proj or re:.*c_attn")
    return names


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--layers {text!r} must be comma-separated layer indices, e.g. 0,2") from None


def settings_from_args(args: argparse.Namespace) -> SuiteSettings:
    """The :class:`SuiteSettings` an argument namespace asks for.

    Raises:
        BadInput: Conflicting or malformed flags (e.g. ``--adapter`` with ``--rank`` or ``--dora``, ``--section``
            without ``--markdown``, ``--rank 0``, ``--loraplus-ratio 0``, ``--targets all-linear`` with ``--layers``).
    """
    if args.section is not None and args.markdown is None:
        raise BadInput(f"--section {args.section} replaces a section of a Markdown page; add --markdown PAGE.md.")
    named = parse_adapters(args.adapter or [])
    adapter = named[0][1] if named else None
    weights = parse_combine_weights(args.combine_weights, len(named))
    if args.adapter is not None:
        given = [f"--{flag}" for flag in _LORA_FLAGS if getattr(args, flag) is not None]
        if given:
            raise BadInput(f"--adapter takes targets, rank, alpha, rsLoRA, layers and DoRA from its "
                           f"adapter_config.json; drop {', '.join(given)}.")
    if args.quantize is not None:
        from parity.quantized import check_quantize_flags

        check_quantize_flags(args.quantize, device=args.device, dtype=args.dtype, adapters=len(named))
    checks = default_checks(args.quantize) if args.checks is None else tuple(
        part.strip() for part in args.checks.split(",") if part.strip())
    _check_loraplus_ratio(args.loraplus_ratio, checks)
    lora = {}
    if args.targets is not None:
        lora["targets"] = _targets(args.targets)
        if lora["targets"] == "all-linear" and args.layers is not None:
            raise BadInput(f"--targets {args.targets} cannot take --layers: PEFT expands all-linear to full module "
                           "names, which layers_to_transform never filters; pass --targets c_attn,c_proj,c_fc "
                           f"--layers {args.layers} instead.")
    if args.rank is not None:
        lora["rank"] = args.rank
    if args.alpha is not None:
        lora["alpha"] = args.alpha
    if args.rslora:
        lora["use_rslora"] = True
    if args.layers is not None:
        lora["layers_to_transform"] = _layers(args.layers)
    if args.dora:
        lora["use_dora"] = True
    # SuiteSettings and LoraConfig validate steps, checks, rank, alpha, targets and layers as they are built.
    try:
        settings = SuiteSettings(adapter=adapter, adapters=named if len(named) > 1 else (),
                                 combine_weights=weights, steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, seed=args.seed, checks=checks,
                                 loraplus_ratio=args.loraplus_ratio, quantize=args.quantize, **lora)
        if args.adapter is None:
            settings.lora_config()
    except (ValueError, TypeError) as error:
        raise BadInput(str(error)) from error
    return settings


def parse_adapters(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--adapter`` values as ``((name, dir), ...)``: all ``NAME=DIR``, or one plain ``DIR`` (named ``default``).

    >>> parse_adapters(["a=/", "b=/tmp"])
    (('a', '/'), ('b', '/tmp'))
    >>> parse_adapters(["/x/a"])
    (('default', '/x/a'),)
    >>> parse_adapters(["a=/", "a=/tmp"])
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --adapter a=/tmp repeats the name a; give each adapter its own name.
    """
    named, plain = [], []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name and "/" not in name and os.sep not in name:
            named.append((name, path))
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise BadInput(f"--adapter {plain[0]} is a plain DIR beside {'NAME=DIR forms' if named else 'another DIR'}; "
                       "name every adapter (--adapter a=DIR1 --adapter b=DIR2), or pass one plain --adapter DIR.")
    if plain:
        return (("default", plain[0]),)
    seen = set()
    for name, path in named:
        if name in seen:
            raise BadInput(f"--adapter {name}={path} repeats the name {name}; give each adapter its own name.")
        if name == "__base__":
            raise BadInput("--adapter __base__=DIR: __base__ means 'no adapter' in a mixed batch; pick another name.")
        if not path:
            raise BadInput(f"--adapter {name}= names no directory; pass --adapter {name}=DIR.")
        if not Path(path).is_dir():
            raise BadInput(f"--adapter {name}={path}: no such directory; pass the PEFT adapter directory "
                           "(adapter_config.json + adapter_model.safetensors).")
        seen.add(name)
    return tuple(named)


def parse_combine_weights(text: str | None, count: int) -> tuple[float, ...] | None:
    """``--combine-weights`` as floats: one finite number per named adapter, and only with two or more.

    >>> parse_combine_weights("0.7,0.3", 2)
    (0.7, 0.3)
    >>> parse_combine_weights("1,inf", 2)
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --combine-weights 1,inf holds a non-finite weight; pass finite numbers, e.g. 0.7,0.3.
    """
    if text is None:
        return None
    if count < 2:
        raise BadInput("--combine-weights weighs the combination of several adapters; pass two or more "
                       "--adapter NAME=DIR, or drop --combine-weights.")
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--combine-weights {text} must be comma-separated numbers, e.g. 0.7,0.3.") from None
    if len(weights) != count:
        raise BadInput(f"--combine-weights {text} gives {len(weights)} weights for {count} adapters; "
                       "give one weight per --adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise BadInput(f"--combine-weights {text} holds a non-finite weight; pass finite numbers, e.g. 0.7,0.3.")
    return weights


def _check_loraplus_ratio(ratio: float | None, checks: tuple[str, ...]) -> None:
    """``--loraplus-ratio`` must be a finite number > 0, and the training check must run to use it.

    >>> _check_loraplus_ratio(16.0, ("training",))
    >>> _check_loraplus_ratio(-1.0, ("training",))
    Traceback (most recent call last):
    ...
    parity.validation.BadInput: --loraplus-ratio -1 must be a finite number > 0 (B's learning rate over A's); pass e.g. --loraplus-ratio 16, as the LoRA+ paper suggests.
    """
    if ratio is None:
        return
    if not (math.isfinite(ratio) and ratio > 0):
        raise BadInput(f"--loraplus-ratio {ratio:g} must be a finite number > 0 (B's learning rate over A's); "
                       "pass e.g. --loraplus-ratio 16, as the LoRA+ paper suggests.")
    if "training" not in checks:
        raise BadInput(f"--loraplus-ratio sets the training check's optimizer, but --checks {','.join(checks)} leaves "
                       "training out; add training to --checks, or drop --loraplus-ratio.")


def validate_inputs(args: argparse.Namespace, settings: SuiteSettings) -> Path:
    """Checks every input before any model is loaded; returns the checkpoint directory.

    Raises:
        BadInput: Unwritable outputs, a missing GPU, a bad checkpoint or adapter, batch flags that do not
            fit the model, or LoRA flags that select nothing adaptable (see :mod:`parity.validation`).
    """
    check_output_paths(json=args.json, markdown=args.markdown, section=args.section, dump=args.dump)
    check_batch_shape(batch_size=settings.batch_size, seq_len=settings.seq_len, seed=settings.seed)
    check_device(args.device)
    if settings.quantize is not None:
        from parity.quantized import check_bitsandbytes

        check_bitsandbytes()
    model_dir, gpt2_config = check_model(args.model)
    check_batch_shape(batch_size=settings.batch_size, seq_len=settings.seq_len, seed=settings.seed,
                      n_positions=gpt2_config["n_positions"], model_dir=model_dir)
    skeleton = gpt2_skeleton(model_dir)
    if settings.adapters:
        for name, path in settings.adapters:
            try:
                check_adapter(path, gpt2_config, skeleton)
            except BadInput as error:
                raise BadInput(f"--adapter {name}: {error}") from error
    elif settings.adapter is not None:
        check_adapter(settings.adapter, gpt2_config, skeleton)
    else:
        check_lora_flags(settings.lora_config(), gpt2_config, skeleton)
    if settings.quantize is not None:
        _check_quantized_targets(settings, gpt2_config, skeleton)
    return model_dir


def _check_quantized_targets(settings: SuiteSettings, gpt2_config: dict, skeleton) -> None:
    """With ``--quantize``: no LoRA on the token embedding (from the flags, or in ``--adapter``'s tensors)."""
    from parity.checkpoint import adapter_factor_shapes
    from parity.quantized import check_quantize_targets
    from lora_torch.inject import select_modules

    if settings.adapter is not None:
        check_quantize_targets(adapter_factor_shapes(settings.adapter, gpt2_config), f"--adapter {settings.adapter}")
    else:
        config = settings.lora_config()
        names = [name for name, _ in select_modules(skeleton, config.target_modules, config.layers_to_transform,
                                                    config.layers_pattern)]
        check_quantize_targets(names, "--targets " + (config.target_modules if isinstance(config.target_modules, str)
                                                      else ",".join(config.target_modules)))


def _write_outputs(args: argparse.Namespace, report) -> None:
    from parity.dump import dump_arrays
    from parity.markdown_sections import upsert_section
    from parity.report import render_json, render_markdown, write_text_atomic

    if args.json:
        write_text_atomic(args.json, render_json(report))
    if args.markdown:
        section = render_markdown(report, title=args.title or f"Parity on {report.settings.get('model')}")
        if args.section:
            path = Path(args.markdown)
            page = path.read_text(encoding="utf-8") if path.is_file() else ""
            section = upsert_section(page, args.section, section)
        write_text_atomic(args.markdown, section)
    if args.dump:
        missing = dump_arrays(args.dump, report.arrays)
        if missing:
            print(f"--dump: not written (their stage failed or did not run): {', '.join(missing)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 pass, 1 a check failed, 2 bad input, 3 divergence)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m parity " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        settings = settings_from_args(args)
        model_dir = validate_inputs(args, settings)
    except BadInput as error:  # only the validation layer raises it; other errors keep their traceback
        print(f"python -m parity: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    from parity.pair import load_pair
    from parity.report import render_table
    from parity.suite import run_suite

    pair = load_pair(model_dir, device=args.device, dtype=args.dtype, quantize=args.quantize)
    report = run_suite(pair, settings, command=command)
    print(render_table(report), end="")
    _write_outputs(args, report)
    diverged = _non_finite_losses(report.arrays)
    if diverged:
        print(f"python -m parity: diverged: non-finite training loss in {', '.join(diverged)} (see the training "
              "rows); check the checkpoint and adapter for NaN/inf weights.", file=sys.stderr)
        return 3
    return 0 if report.passed else 1


def _non_finite_losses(arrays: dict) -> list[str]:
    """Names of the loss trajectories (``*_losses``) that hold a NaN or inf.

    >>> import numpy as np
    >>> _non_finite_losses({"jax_losses": np.array([2.0, np.nan]), "torch_losses": np.ones(2), "x": np.array([np.inf])})
    ['jax_losses']
    """
    import numpy as np

    return sorted(name for name, values in arrays.items()
                  if name.endswith("_losses") and not np.all(np.isfinite(np.asarray(values, dtype=np.float64))))
