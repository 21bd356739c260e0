"""Writes a ``compare_implementations.py`` run as JSON, a markdown table and a bar chart."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from lora_torch.tensor_files import atomic_destination
from parity.environment import package_versions

BASELINE = "peft"  # ratios are against PEFT eager, the implementation most people use


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str, threads: int) -> dict:
    """Where the numbers come from: CPU, accelerator, threads, versions."""
    import jax
    import torch

    info = {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": package_versions(),
            "jax_devices": [str(d) for d in jax.devices()]}
    if device == "gpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio_rows(config: dict) -> dict[str, float]:
    rates = {r["name"]: r["tokens_per_s_median"] for r in config["results"]}
    base = rates.get(BASELINE)
    return {name: rate / base for name, rate in rates.items()} if base else {}


def _markdown(report: dict) -> Iterator[str]:
    m = report["machine"]
    yield "# Implementation comparison: one LoRA training step\n"
    yield f"Command: `{report['command']}`\n"
    yield (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} threads "
           f"(torch {m['torch_threads']}){', GPU ' + m['gpu'] if 'gpu' in m else ''}; "
           f"{m['platform']}; python {m['python']}.\n")
    yield "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n"
    yield (f"Timing: {report['warmup']} warm-up steps each, then {report['steps']} interleaved rounds "
           "(one step of every implementation per round, rotating order). Tokens/s is the median "
           "with [min, max]; the ratio column divides by PEFT eager's median in the same run.\n")
    for config in report["configs"]:
        w, ratios, peak = config["workload"], _ratio_rows(config), config["matmul_peak"]
        yield (f"\n## GPT-2 {config['preset']} ({w['n_layer']} layers, width {w['n_embd']}), "
               f"batch {w['batch']} x {w['seq']}, {w['dtype']}, LoRA r=16 on c_attn/c_proj/c_fc\n")
        yield (f"Matmul roof measured in this run: {peak['gflops']:.0f} GFLOP/s ({peak['dtype']}, "
               f"{'x'.join(map(str, peak['shape']))}; torch {peak['torch_gflops']:.0f}, XLA {peak['jax_gflops']:.0f}).\n")
        gpu = any("cuda_peak_mb" in r or "xla_allocator_peak_so_far_mb" in r for r in config["results"])
        yield ("| implementation | training | tokens/s median [min, max] | step ms | x PEFT eager | "
               "GFLOP/step analytic (XLA) | GFLOP/s | of roof | peak RSS in step MB | XLA peak MB | warm-up s |"
               + (" GPU allocator peak MB |" if gpu else ""))
        yield "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")
        for r in config["results"]:
            gpu_peak = r.get("cuda_peak_mb", r.get("xla_allocator_peak_so_far_mb"))
            yield (f"| {r['name']} | {r['training']} | {r['tokens_per_s_median']:.0f} "
                   f"[{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | {1000 * r['step_s_median']:.0f} | "
                   f"{_fmt(ratios.get(r['name']), '.2f')} | {r['flops_per_step'] / 1e9:.0f} ({_fmt(r.get('xla_flops_per_step', 0) / 1e9 or None)}) | "
                   f"{_fmt(r.get('achieved_gflops'))} | {_fmt(r.get('utilisation_vs_peak'), '.0%')} | "
                   f"{_fmt(r.get('peak_rss_mb'))} | {_fmt(r.get('xla_peak_mb'))} | {r['warmup_s']:.1f} |"
                   + (f" {_fmt(gpu_peak)} |" if gpu else ""))
        if config["skipped"]:
            yield f"\nSkipped (not installed): {', '.join(config['skipped'])}.\n"
        if config["memory_table"]:
            yield "\nXLA memory analysis of the JAX step (compile only), MB:\n"
            yield "| training | remat | arguments | outputs | temporaries | aliased (donated) | peak |"
            yield "|---|---|---|---|---|---|---|"
            for row in config["memory_table"]:
                yield (f"| {row['training']} | {row['remat']} | {row['xla_argument_mb']:.0f} | {row['xla_output_mb']:.0f} | "
                       f"{row['xla_temp_mb']:.0f} | {row['xla_alias_mb']:.0f} | {row['xla_peak_mb']:.0f} |")
    yield ("\nPeak RSS is the whole process (every implementation's weights stay resident) sampled every "
           "2 ms during that implementation's steps; compare it across rows, not to the model size. "
           "The GPU allocator peak likewise includes every implementation's resident weights; XLA's "
           "cannot be reset, so its value is the peak of the process up to that step. "
           "XLA peak = arguments + outputs + temporaries - aliased. GFLOP/s and the share of the roof use "
           "the hand count (`analytic_flops` in examples/benchmark_steps.py) for every row; on GPU the share of the "
           "measured bf16 roof is the MFU. XLA's cost "
           "analysis is shown in brackets. It matches the hand count where the step has no loop "
           "(jax_lora_logits) and undercounts the chunked loss, whose scan body XLA counts once.\n")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    configs = report["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 4.5), squeeze=False)
    for ax, config in zip(axes[0], configs):
        rows = config["results"]
        names = [r["name"] for r in rows]
        med = [r["tokens_per_s_median"] for r in rows]
        err = [[m - r["tokens_per_s_min"] for m, r in zip(med, rows)], [r["tokens_per_s_max"] - m for m, r in zip(med, rows)]]
        colors = [to_rgba("tab:blue" if r["framework"] == "jax" else "tab:orange", 0.45 if r["training"] == "full" else 1.0)
                  for r in rows]
        bars = ax.bar(names, med, yerr=err, capsize=3, color=colors)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        w = config["workload"]
        ax.set_title(f"GPT-2 {config['preset']}, {w['batch']}x{w['seq']} {w['dtype']}")
        ax.set_ylabel("tokens / s (median, min-max)")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    fig.suptitle(f"LoRA r=16 training step, blue JAX / orange torch, faded = full FT ({report['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, prefix: str) -> list[str]:
    """Writes ``prefix.json``, ``prefix.md`` and ``prefix.png`` atomically; returns the paths."""
    writers = {
        ".json": lambda tmp: tmp.write_text(json.dumps(report, indent=2), encoding="utf-8"),
        ".md": lambda tmp: tmp.write_text("\n".join(_markdown(report)) + "\n", encoding="utf-8"),
        ".png": lambda tmp: _plot(report, tmp),
    }
    for ext, write in writers.items():
        with atomic_destination(prefix + ext) as tmp:  # temp file beside the target, renamed on success
            write(tmp)
    return [prefix + ext for ext in writers]
