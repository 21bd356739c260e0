"""Speed and memory of one LoRA training step, implementation against implementation, in one run.

Every implementation trains the same GPT-2 shape (random init, no download) on the same batch,
with LoRA rank 16 (alpha 32) on ``c_attn``, ``c_proj`` and ``c_fc`` and AdamW:

- ``jax_lora``: ``lora_jax`` with ``lm_loss(model, chunk_size=256)`` (``--chunk-size``), the
  chunked, gradient-fused LM-head loss; jitted, donated buffers.
- ``jax_lora_logits``: the same with ``lm_loss(model)``, the plain full-logits loss (shows what the
  chunked head buys).
- ``torch_lora`` / ``torch_lora_compile``: ``lora_torch`` on transformers' GPT-2, eager / torch.compile.
- ``peft`` / ``peft_compile``: PEFT on the same model, eager / torch.compile.
- ``qwix``: Google's qwix LoRA (``qwix.LoraProvider``) on the same linen GPT-2, weights, A/B, loss and AdamW
  (``qwix_lora_step.py``); skipped with a note when qwix is not installed.
- ``jax_full`` / ``torch_full``: full fine-tuning, the reference cost.

Every row reports its share of the matmul roof measured in the same run, of the best one and of its own
framework's (XLA's or torch's), and the report states both roofs side by side. ``--bf16`` adds bf16-compute
rows of lora_jax and PEFT beside their float32 twins at a small shape, with the CPU's bf16 flags;
``--scaling`` adds lora_jax, PEFT eager and PEFT compiled at batch x seq 4x128, 2x512 and 1x1024 (a table and
``<out>_scaling.png``). Torch gets its best settings: fused AdamW, SDPA, ``torch.compile`` default mode, the
same thread count.

``--impls`` also takes the DoRA twins ``jax_dora``, ``torch_dora`` and ``peft_dora``; their own report,
with DoRA / plain ratios, is ``benchmark_dora.py``'s.

Timing is interleaved: after each implementation's warm-up (compilation), every round runs one
step of each implementation, in a rotating order, so drifting machine load hits all of them
alike. Tokens/s is the median over rounds, with min and max.

CPU (the committed docs/benchmark_cpu.*)::

    python examples/compare_implementations.py --device cpu --threads 2 --steps 8 --warmup 2 --bf16 --scaling

GPU: ``--device gpu`` runs GPT-2 small and medium at 16 x 1024 in bf16 and reports MFU against
a bf16 matmul peak measured in the same run. Quick smoke run: ``--steps 1 --warmup 1 --layers 2``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))  # sibling modules when run as a script
# benchmark_steps imports jax and torch only inside its builders, so the flags below still take effect.
from benchmark_steps import (  # noqa: E402
    BF16_ROWS,
    CHUNK_SIZE,
    IMPLEMENTATIONS,
    LORA_COMPARISON,
    Workload,
    build_implementation,
    jax_memory_table,
    matmul_peak_gflops,
    set_backend_environment,
)

SCALING_SHAPES = ((4, 128), (2, 512), (1, 1024))  # (batch, seq): 512, 1024, 1024 tokens; attention grows with seq
SCALING_IMPLS = ("jax_lora", "peft", "peft_compile")
BF16_SHAPE = {"n_layer": 1, "batch": 2, "seq": 32}
PRESETS = {"small": dict(n_embd=768, n_layer=12, n_head=12), "medium": dict(n_embd=1024, n_layer=24, n_head=16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and XLA")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (one step of each implementation per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation (compilation)")
    p.add_argument("--configs", nargs="+", choices=list(PRESETS), default=None,
                   help="model shapes (default: small on CPU, both on GPU)")
    p.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 16 on GPU")
    p.add_argument("--seq", type=int, default=None, help="default 128 on CPU, 1024 on GPU")
    p.add_argument("--layers", type=int, default=None, help="override n_layer (smoke runs)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLEMENTATIONS), default=None,
                   help="implementations to run (default: all but the DoRA ones, which benchmark_dora.py compares)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="token rows per LM-head chunk (jax_lora)")
    p.add_argument("--no-memory-table", action="store_true", help="skip the compile-only remat memory table")
    p.add_argument("--bf16", action="store_true",
                   help=f"also time the bf16-compute rows {' and '.join(BF16_ROWS)} against their float32 twins at "
                        f"{BF16_SHAPE['n_layer']} layer(s), batch {BF16_SHAPE['batch']} x {BF16_SHAPE['seq']} "
                        "(informational; fp32 stays the headline)")
    p.add_argument("--bf16-steps", type=int, default=2, help="timed rounds of the bf16 comparison")
    p.add_argument("--scaling", action="store_true",
                   help="also time " + ", ".join(SCALING_IMPLS) + " at batch x seq " +
                        ", ".join(f"{b}x{t}" for b, t in SCALING_SHAPES) + " (a table and a plot)")
    p.add_argument("--scaling-steps", type=int, default=3, help="timed rounds per scaling shape")
    p.add_argument("--out", default=None, help="output prefix (default docs/benchmark_<device>)")
    args = p.parse_args(argv)
    # batch, seq and layers default to None; a 0 must not fall back to the default silently.
    too_small = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}"
                 for n in ("steps", "warmup", "threads", "chunk_size", "batch", "seq", "layers", "scaling_steps", "bf16_steps")
                 if getattr(args, n) is not None and getattr(args, n) < 1]
    if too_small:
        p.error("; ".join(too_small))  # exit code 2, like argparse's own errors
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    set_backend_environment(ARGS.device, ARGS.threads)  # before jax is first imported

import statistics  # noqa: E402

from benchmark_report import machine_info, write_report  # noqa: E402


def run_rounds(impls: list, steps: int, warmup: int) -> dict[str, list[float]]:
    """Warms each implementation up, then times ``steps`` rounds of one step each, order rotating."""
    for impl in impls:
        t0 = time.perf_counter()
        for _ in range(warmup):
            impl.step()
        impl.info["warmup_s"] = time.perf_counter() - t0
        print(f"  warmed up {impl.name} in {impl.info['warmup_s']:.1f}s", flush=True)
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for r in range(steps):
        order = impls[r % len(impls):] + impls[: r % len(impls)]
        for impl in order:
            t0 = time.perf_counter()
            impl.measured_step()
            times[impl.name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{steps}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    return times


def summarize(impl, seconds: list[float], tokens: int, peaks: dict[str, dict]) -> dict:
    """One result row: tokens/s (median, min, max), step time, FLOPs, utilisation, memory.

    ``peaks`` maps a dtype to ``matmul_peak_gflops``'s result. ``utilisation_vs_peak`` divides by the
    best roof of the row's dtype (torch or XLA), ``utilisation_vs_own_roof`` by its own framework's.
    """
    median = statistics.median(seconds)
    row = {
        "name": impl.name,
        "framework": impl.framework,
        "training": impl.training,
        "step_s_median": median,
        "step_s_all": seconds,
        "tokens_per_s_median": tokens / median,
        "tokens_per_s_min": tokens / max(seconds),
        "tokens_per_s_max": tokens / min(seconds),
        **impl.info,
    }
    flops, peak = impl.info.get("flops_per_step"), peaks.get(impl.info.get("dtype"))
    if flops:
        row["achieved_gflops"] = flops / median / 1e9
        if peak:
            row["utilisation_vs_peak"] = row["achieved_gflops"] / peak["gflops"]
            row["utilisation_vs_own_roof"] = row["achieved_gflops"] / peak[f"{impl.framework}_gflops"]
    return row


def _workload(args, preset: str, dtype: str, batch: int, seq: int) -> Workload:
    shape = dict(PRESETS[preset])
    if args.layers:
        shape["n_layer"] = args.layers
    return Workload(preset=preset, batch=batch, seq=seq, dtype=dtype, device=args.device,
                    chunk_size=args.chunk_size, **shape)


def time_implementations(names: list[str], workload: Workload, steps: int, warmup: int,
                         peaks: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Builds ``names`` on ``workload``, times them interleaved; ``(rows, skipped names)``."""
    impls = [impl for impl in (build_implementation(name, workload) for name in names) if impl is not None]
    times = run_rounds(impls, steps, warmup)
    rows = [summarize(impl, times[impl.name], workload.batch * workload.seq, peaks) for impl in impls]
    for impl in impls:
        impl.close()
    return rows, [name for name in names if name not in times]


def run_config(args, preset: str, dtype: str) -> dict:
    workload = _workload(args, preset, dtype, args.batch, args.seq)
    names = list(args.impls or LORA_COMPARISON)
    print(f"[{preset}] {workload}", flush=True)
    peaks = {dtype: matmul_peak_gflops(args.device, dtype)}
    rows, skipped = time_implementations(names, workload, args.steps, args.warmup, peaks)
    memory = [] if args.no_memory_table else jax_memory_table(workload)
    return {"preset": preset, "workload": workload.as_dict(), "matmul_peak": peaks[dtype], "matmul_peaks": peaks,
            "results": rows, "skipped": skipped, "memory_table": memory}


def run_bf16(args, preset: str) -> dict:
    """``BF16_ROWS`` and their float32 twins, interleaved, at ``BF16_SHAPE`` (CPU).

    A small shape: on a CPU without native bf16 (no avx512_bf16 / amx_bf16) torch's bf16 matmul runs
    at a fraction of a GFLOP/s, so PEFT's bf16 step on the full shape would take tens of minutes.
    """
    shape = BF16_SHAPE
    args_small = argparse.Namespace(**{**vars(args), "layers": shape["n_layer"]})
    workload = _workload(args_small, preset, "float32", shape["batch"], shape["seq"])
    print(f"[bf16] {workload}", flush=True)
    # bf16 on CPU: n=512, or torch's slow bf16 kernels make the roof itself take minutes.
    peaks = {"float32": matmul_peak_gflops(args.device, "float32"),
             "bfloat16": matmul_peak_gflops(args.device, "bfloat16", n=512)}
    names = [name for pair in zip(("jax_lora", "peft"), BF16_ROWS) for name in pair]
    rows, skipped = time_implementations(names, workload, args.bf16_steps, 1, peaks)
    return {"workload": workload.as_dict(), "matmul_peaks": peaks, "results": rows, "skipped": skipped}


def run_scaling(args, preset: str, dtype: str, peaks: dict[str, dict]) -> list[dict]:
    """``SCALING_IMPLS`` at each of ``SCALING_SHAPES``, each shape its own interleaved run."""
    out = []
    for batch, seq in SCALING_SHAPES:
        workload = _workload(args, preset, dtype, batch, seq)
        print(f"[scaling {batch}x{seq}] {workload}", flush=True)
        rows, skipped = time_implementations(list(SCALING_IMPLS), workload, args.scaling_steps, args.warmup, peaks)
        out.append({"batch": batch, "seq": seq, "workload": workload.as_dict(), "results": rows, "skipped": skipped})
    return out


def main(args: argparse.Namespace) -> None:
    gpu = args.device == "gpu"
    args.batch = args.batch or (16 if gpu else 4)
    args.seq = args.seq or (1024 if gpu else 128)
    dtype = "bfloat16" if gpu else "float32"
    presets = args.configs or (["small", "medium"] if gpu else ["small"])
    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info(args.device, args.threads),
        "steps": args.steps,
        "warmup": args.warmup,
        "configs": [run_config(args, preset, dtype) for preset in presets],
    }
    if args.bf16:
        report["bf16"] = run_bf16(args, presets[0])
    if args.scaling:
        report["scaling"] = run_scaling(args, presets[0], dtype, report["configs"][0]["matmul_peaks"])
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "docs", f"benchmark_{args.device}")
    for path in write_report(report, os.path.normpath(out)):
        print("wrote", path)


if __name__ == "__main__":
    main(ARGS)
