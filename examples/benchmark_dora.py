"""The DoRA training step against a plain LoRA step, lora_jax, lora_torch and PEFT, in one run.

Six implementations train the same GPT-2 shape (small: 12 layers, width 768; random init, no
download) on the same batch, LoRA rank 16 (alpha 32) on ``c_attn``, ``c_proj`` and ``c_fc``, AdamW:

- ``jax_lora`` / ``jax_dora``: ``lora_jax`` with the chunked LM-head loss, ``use_dora`` off / on;
- ``torch_lora`` / ``torch_dora``: ``lora_torch`` on transformers' GPT-2, eager;
- ``peft`` / ``peft_dora``: PEFT on the same model, eager.

The steps are ``benchmark_steps.py``'s and the timing is ``compare_implementations.py``'s: warm-up,
then interleaved rounds with one step of each implementation in a rotating order. The report gives
tokens/s (median [min, max]), DoRA / plain within each framework, every row against PEFT's DoRA
eager, and the machine's load average at start and end (``os.getloadavg``)::

    python examples/benchmark_dora.py --threads 2 --steps 10 --warmup 2

writes docs/benchmark_dora.json and docs/benchmark_dora.md. Smoke run: ``--layers 1 --batch 2 --seq 32
--steps 1 --warmup 1 --out /tmp/dora``. CPU only, float32. Exit codes: 0 written, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # sibling modules when run as a script
# benchmark_steps imports jax and torch only inside its builders, so the environment set below still takes effect.
from benchmark_steps import CHUNK_SIZE, set_backend_environment  # noqa: E402

DORA_IMPLEMENTATIONS = ["jax_lora", "jax_dora", "torch_lora", "torch_dora", "peft", "peft_dora"]
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmark_dora")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad input is one line on stderr (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _OneLineParser(prog="benchmark_dora.py", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and XLA")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each implementation per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation (compilation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="override GPT-2 small's 12 layers (smoke runs)")
    p.add_argument("--impls", nargs="+", choices=DORA_IMPLEMENTATIONS, default=None,
                   help="subset of implementations to run (default: all six)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="token rows per LM-head chunk (jax rows)")
    p.add_argument("--out", default=None, help="output prefix, .json and .md are added (default docs/benchmark_dora)")
    args = p.parse_args(argv)
    too_small = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}"
                 for n in ("steps", "warmup", "threads", "chunk_size", "batch", "seq", "layers")
                 if getattr(args, n) is not None and getattr(args, n) < 1]
    if too_small:
        p.error("; ".join(too_small))
    if args.seq > 1024:
        p.error(f"--seq must be <= 1024 (GPT-2's n_positions), got {args.seq}")
    out_dir = os.path.dirname(os.path.abspath(args.out or DEFAULT_OUT))
    if not os.path.isdir(out_dir):  # refused now, not after minutes of timing
        p.error(f"--out {args.out!r}: the folder {out_dir} does not exist; create it or choose another prefix")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    set_backend_environment("cpu", ARGS.threads)  # before jax is first imported


def main(args: argparse.Namespace) -> int:
    load_start = list(os.getloadavg())
    from benchmark_report import dora_ratios, machine_info, write_dora_report
    from compare_implementations import run_config

    harness_args = argparse.Namespace(device="cpu", layers=args.layers, batch=args.batch, seq=args.seq,
                                      chunk_size=args.chunk_size, impls=args.impls or DORA_IMPLEMENTATIONS,
                                      steps=args.steps, warmup=args.warmup, no_memory_table=True)
    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info("cpu", args.threads),
        "load_average_start": load_start,
        "steps": args.steps,
        "warmup": args.warmup,
        "config": run_config(harness_args, "small", "float32"),
    }
    report["load_average_end"] = list(os.getloadavg())
    report["ratios"] = dora_ratios(report["config"]["results"])
    for path in write_dora_report(report, os.path.normpath(args.out or DEFAULT_OUT)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
