"""Writes a ``compare_implementations.py`` run as JSON, a markdown table and a bar chart, and a
``benchmark_dora.py`` run as JSON and markdown with its DoRA / plain ratios."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from lora_torch.tensor_files import atomic_destination
from parity.environment import package_versions

BASELINE = "peft"  # ratios are against PEFT eager, the implementation most people use
HEADLINE = "jax_lora"
PEERS = ("peft", "peft_compile", "torch_lora", "torch_lora_compile", "qwix")  # issue 13's "best peer"
GOALS = {"over_best_peer": 1.2, "of_xla_roof": 0.60}  # issue 13, fp32 on the 2-core CI machine type


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx_vnni", "avx2")


def cpu_bf16_support(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of ``BF16_FLAGS`` the CPU reports in ``/proc/cpuinfo`` (its first ``flags`` line).

    ``avx512_bf16`` and ``amx_bf16`` are native bf16 dot products; without them a library converts bf16
    itself, well (XLA) or very slowly (torch's CPU bf16 GEMM on AVX2: under 1 GFLOP/s).

    >>> cpu_bf16_support("flags : fpu avx2 fma")
    {'avx512_bf16': False, 'amx_bf16': False, 'amx_tile': False, 'avx512f': False, 'avx_vnni': False, 'avx2': True}
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return {flag: flag in flags for flag in BF16_FLAGS}


def machine_info(device: str, threads: int) -> dict:
    """Where the numbers come from: CPU, accelerator, threads, versions."""
    import jax
    import torch

    info = {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": package_versions(),
            "jax_devices": [str(d) for d in jax.devices()], "cpu_bf16": cpu_bf16_support()}
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
        yield _roofs_line(config)
        for line in _goal_lines(config):
            yield line
        gpu = any("cuda_peak_mb" in r or "xla_allocator_peak_so_far_mb" in r for r in config["results"])
        yield ("| implementation | training | tokens/s median [min, max] | step ms | x PEFT eager | "
               "GFLOP/step analytic (XLA) | GFLOP/s | of best roof | of own roof | peak RSS in step MB | XLA peak MB | "
               "warm-up s |" + (" GPU allocator peak MB |" if gpu else ""))
        yield "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")
        for r in config["results"]:
            gpu_peak = r.get("cuda_peak_mb", r.get("xla_allocator_peak_so_far_mb"))
            yield (f"| {r['name']} | {r['training']} | {r['tokens_per_s_median']:.0f} "
                   f"[{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | {1000 * r['step_s_median']:.0f} | "
                   f"{_fmt(ratios.get(r['name']), '.2f')} | {r['flops_per_step'] / 1e9:.0f} ({_fmt(r.get('xla_flops_per_step', 0) / 1e9 or None)}) | "
                   f"{_fmt(r.get('achieved_gflops'))} | {_fmt(r.get('utilisation_vs_peak'), '.0%')} | "
                   f"{_fmt(r.get('utilisation_vs_own_roof'), '.0%')} | "
                   f"{_fmt(r.get('peak_rss_mb'))} | {_fmt(r.get('xla_peak_mb'))} | {r['warmup_s']:.1f} |"
                   + (f" {_fmt(gpu_peak)} |" if gpu else ""))
        for line in _qwix_check_lines(config):
            yield line
        if config["skipped"]:
            yield f"\nSkipped (not installed): {', '.join(config['skipped'])}.\n"
        if config["memory_table"]:
            yield "\nXLA memory analysis of the JAX step (compile only), MB:\n"
            yield "| training | remat | arguments | outputs | temporaries | aliased (donated) | peak |"
            yield "|---|---|---|---|---|---|---|"
            for row in config["memory_table"]:
                yield (f"| {row['training']} | {row['remat']} | {row['xla_argument_mb']:.0f} | {row['xla_output_mb']:.0f} | "
                       f"{row['xla_temp_mb']:.0f} | {row['xla_alias_mb']:.0f} | {row['xla_peak_mb']:.0f} |")
    if report.get("bf16"):
        for line in _bf16_lines(report["bf16"], m.get("cpu_bf16", {})):
            yield line
    if report.get("scaling"):
        for line in _scaling_lines(report["scaling"]):
            yield line
    yield ("\nPeak RSS is the whole process (every implementation's weights stay resident) sampled every "
           "2 ms during that implementation's steps; compare it across rows, not to the model size. "
           "The GPU allocator peak likewise includes every implementation's resident weights; XLA's "
           "cannot be reset, so its value is the peak of the process up to that step. "
           "XLA peak = arguments + outputs + temporaries - aliased. GFLOP/s and the share of the roof use "
           "the hand count (`analytic_flops` in examples/benchmark_steps.py) for every row; on GPU the share of the "
           "measured bf16 roof is the MFU. The best roof is the faster of torch's and XLA's on the row's dtype, the own "
           "roof that of the row's framework (qwix runs on XLA). XLA's cost "
           "analysis is shown in brackets. It matches the hand count where the step has no loop "
           "(jax_lora_logits) and undercounts the chunked loss, whose scan body XLA counts once.\n")


def _roofs_line(config: dict) -> str:
    """The host's XLA and torch matmul roofs side by side, per dtype."""
    peaks = config.get("matmul_peaks") or {config["matmul_peak"]["dtype"]: config["matmul_peak"]}
    parts = [f"{dtype} ({'x'.join(map(str, p['shape']))}) XLA {p['jax_gflops']:.3g}, torch {p['torch_gflops']:.3g} "
             f"(XLA / torch {p['jax_gflops'] / p['torch_gflops']:.2f})" for dtype, p in peaks.items()]
    return f"Matmul roofs measured in this run, GFLOP/s, best of 10: {'; '.join(parts)}.\n"


def best_peer_ratio(results: list[dict]) -> dict | None:
    """``HEADLINE``'s tokens/s over the fastest present peer's (by median), with the round-by-round range."""
    rows = {r["name"]: r for r in results}
    peers = [rows[name] for name in PEERS if name in rows]
    if HEADLINE not in rows or not peers:
        return None
    best = max(peers, key=lambda r: r["tokens_per_s_median"])
    return {"peer": best["name"], **_ratio(rows[HEADLINE], best)}


def _goal_lines(config: dict) -> Iterator[str]:
    rows = {r["name"]: r for r in config["results"]}
    over = best_peer_ratio(config["results"])
    if over is None or config["workload"]["dtype"] != "float32":
        return
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    share = rows[HEADLINE].get("utilisation_vs_own_roof")
    yield (f"Goals (issue 13): {HEADLINE} >= {GOALS['over_best_peer']}x the best peer "
           f"({', '.join(n for n in PEERS if n in rows)}): the best is {over['peer']}; {HEADLINE} is "
           f"{over['median_ratio']:.2f}x it (round by round [{over['round_min']:.2f}, {over['round_max']:.2f}]), "
           f"{met(over['median_ratio'] >= GOALS['over_best_peer'])}."
           + ("" if share is None else f" {HEADLINE} >= {GOALS['of_xla_roof']:.0%} of the XLA float32 roof: "
              f"{share:.0%}, {met(share >= GOALS['of_xla_roof'])}.") + "\n")


def _qwix_check_lines(config: dict) -> Iterator[str]:
    rows = {r["name"]: r for r in config["results"]}
    if "qwix" not in rows or "first_loss" not in rows["qwix"] or "first_loss" not in rows.get(HEADLINE, {}):
        return
    ours, theirs = rows[HEADLINE]["first_loss"], rows["qwix"]["first_loss"]
    yield (f"\nqwix (`qwix.LoraProvider` on this project's linen GPT-2, examples/qwix_lora_step.py) starts from "
           f"{HEADLINE}'s base weights and A/B and trains with the same loss and AdamW, differentiating only its "
           f"`*_lora_a`/`*_lora_b` leaves: first-step loss {theirs:.6f} vs {HEADLINE} {ours:.6f} "
           f"(|difference| {abs(theirs - ours):.1e}).\n")


def _bf16_lines(section: dict, flags: dict[str, bool]) -> Iterator[str]:
    w, rows = section["workload"], {r["name"]: r for r in section["results"]}
    native = [f for f in ("avx512_bf16", "amx_bf16") if flags.get(f)]
    yield (f"\n## bf16 compute (informational; float32 is the headline), {w['n_layer']} layer(s), "
           f"batch {w['batch']} x {w['seq']}\n")
    yield ("CPU bf16 support (/proc/cpuinfo): " + (f"native ({', '.join(native)})" if native else
           "no native bf16 instructions (neither avx512_bf16 nor amx_bf16; present: "
           + (", ".join(f for f, on in flags.items() if on) or "none") + "); each library converts in its own way, "
           "see the bfloat16 roofs")
           + ". " + _roofs_line(section))
    yield "| implementation | compute | tokens/s median [min, max] | bf16 / float32 (same framework) | of own roof |"
    yield "|---|---|---|---|---|"
    for r in section["results"]:
        twin = rows.get(r["name"].removesuffix("_bf16")) if r["name"].endswith("_bf16") else None
        yield (f"| {r['name']} | {r.get('dtype', '-')} | {r['tokens_per_s_median']:.1f} [{r['tokens_per_s_min']:.1f}, "
               f"{r['tokens_per_s_max']:.1f}] | "
               f"{_fmt(twin and r['tokens_per_s_median'] / twin['tokens_per_s_median'], '.2f')} | "
               f"{_fmt(r.get('utilisation_vs_own_roof'), '.0%')} |")
    if section["skipped"]:
        yield f"\nSkipped (not installed): {', '.join(section['skipped'])}.\n"


def _scaling_lines(scaling: list[dict]) -> Iterator[str]:
    names = list(dict.fromkeys(r["name"] for shape in scaling for r in shape["results"]))
    yield "\n## Scaling with sequence length (float32, same model and adapter)\n"
    yield ("Each shape is its own interleaved run; tokens/s median [min, max]. The plot is the `*_scaling.png` "
           "beside this file.\n")
    ratio_cols = [n for n in names if n != HEADLINE and HEADLINE in names]
    yield ("| batch x seq | " + " | ".join(names) + " | "
           + " | ".join(f"{HEADLINE} / {n}" for n in ratio_cols) + " |")
    yield "|---|" + "---|" * (len(names) + len(ratio_cols))
    for shape in scaling:
        rows = {r["name"]: r for r in shape["results"]}
        cells = [f"{rows[n]['tokens_per_s_median']:.0f} [{rows[n]['tokens_per_s_min']:.0f}, "
                 f"{rows[n]['tokens_per_s_max']:.0f}]" if n in rows else "-" for n in names]
        ratios = [f"{rows[HEADLINE]['tokens_per_s_median'] / rows[n]['tokens_per_s_median']:.2f}"
                  if HEADLINE in rows and n in rows else "-" for n in ratio_cols]
        yield f"| {shape['batch']} x {shape['seq']} | " + " | ".join(cells + ratios) + " |"


def _plot_scaling(scaling: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(r["name"] for shape in scaling for r in shape["results"]))
    for name in names:
        points = [(shape["seq"], r) for shape in scaling for r in shape["results"] if r["name"] == name]
        seqs = [seq for seq, _ in points]
        med = [r["tokens_per_s_median"] for _, r in points]
        err = [[m - r["tokens_per_s_min"] for m, (_, r) in zip(med, points)],
               [r["tokens_per_s_max"] - m for m, (_, r) in zip(med, points)]]
        ax.errorbar(seqs, med, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([shape["seq"] for shape in scaling], [f"{s['batch']}x{s['seq']}" for s in scaling])
    ax.set_xlabel("batch x seq")
    ax.set_ylabel("tokens / s (median, min-max)")
    ax.set_title("LoRA r=16 step, GPT-2 small, float32: scaling with seq", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


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
    """Writes ``prefix.json``, ``prefix.md`` and ``prefix.png`` atomically, and ``prefix_scaling.png`` when the
    run has a scaling section; returns the paths."""
    writers = {
        ".json": lambda tmp: tmp.write_text(json.dumps(report, indent=2), encoding="utf-8"),
        ".md": lambda tmp: tmp.write_text("\n".join(_markdown(report)) + "\n", encoding="utf-8"),
        ".png": lambda tmp: _plot(report, tmp),
    }
    if report.get("scaling"):
        writers["_scaling.png"] = lambda tmp: _plot_scaling(report["scaling"], tmp)
    for ext, write in writers.items():
        with atomic_destination(prefix + ext) as tmp:  # temp file beside the target, renamed on success
            write(tmp)
    return [prefix + ext for ext in writers]


# ------------------------------------------------------------------------------------------ DoRA

DORA_BASELINE = "peft_dora"  # the issue's yardstick: PEFT's DoRA step, eager
DORA_GOAL = ("jax_dora", 1.3)  # lora_jax's DoRA step at least 1.3x PEFT DoRA eager
PLAIN_OF = {"jax_dora": "jax_lora", "torch_dora": "torch_lora", "peft_dora": "peft"}


def _ratio(fast: dict, slow: dict) -> dict:
    """``fast`` tokens/s over ``slow``'s: the ratio of medians, and its range over the rounds.

    Rounds are interleaved, so round ``i`` of both rows ran under the same machine load; the per-round
    ratios show how far load moved the ratio of medians.
    """
    per_round = [s / f for f, s in zip(fast["step_s_all"], slow["step_s_all"])]
    return {"median_ratio": fast["tokens_per_s_median"] / slow["tokens_per_s_median"],
            "round_min": min(per_round), "round_max": max(per_round)}


def dora_ratios(results: list[dict]) -> dict:
    """DoRA / plain LoRA within each framework, every row over PEFT DoRA eager, and the goal's verdict.

    A pair or the baseline missing from ``results`` (not run, or skipped) is left out; the goal is then
    ``met: None``, not measured.
    """
    rows = {r["name"]: r for r in results}
    base = rows.get(DORA_BASELINE)
    goal_name, goal = DORA_GOAL
    over_base = {name: _ratio(row, base) for name, row in rows.items()} if base else {}
    reached = over_base.get(goal_name, {}).get("median_ratio")
    return {
        "dora_over_plain": {dora: _ratio(rows[dora], rows[plain]) for dora, plain in PLAIN_OF.items()
                            if dora in rows and plain in rows},
        "over_" + DORA_BASELINE: over_base,
        "goal": {"implementation": goal_name, "baseline": DORA_BASELINE, "at_least": goal, "median_ratio": reached,
                 "met": None if reached is None else reached >= goal},
    }


def _fmt_ratio(ratio: dict | None) -> str:
    return "-" if ratio is None else f"{ratio['median_ratio']:.2f} [{ratio['round_min']:.2f}, {ratio['round_max']:.2f}]"


def load_text(avg: list[float]) -> str:
    """A load-average triple as markdown text.

    >>> load_text([0.5, 1, 2])
    '0.50 / 1.00 / 2.00'
    """
    return " / ".join(f"{x:.2f}" for x in avg)


def run_header_lines(report: dict) -> Iterator[str]:
    """The command, machine, package versions and load average of a benchmark report, as markdown paragraphs.

    >>> report = {"command": "python b.py", "load_average_start": [0.5, 1, 2], "load_average_end": [2, 1, 0.5],
    ...           "machine": {"cpu": "CPU", "logical_cores": 2, "threads": 2, "torch_threads": 2, "platform": "Linux",
    ...                       "python": "3.11", "versions": {"jax": "0.10"}}}
    >>> print("".join(run_header_lines(report)))
    Command: `python b.py`
    Machine: CPU, 2 logical cores, 2 threads (torch 2); Linux; python 3.11.
    Versions: jax 0.10.
    Load average (1 / 5 / 15 min, `os.getloadavg()`): 0.50 / 1.00 / 2.00 at the start, 2.00 / 1.00 / 0.50 at the end.
    <BLANKLINE>
    """
    m = report["machine"]
    yield f"Command: `{report['command']}`\n"
    yield (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} threads "
           f"(torch {m['torch_threads']}); {m['platform']}; python {m['python']}.\n")
    yield "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n"
    yield (f"Load average (1 / 5 / 15 min, `os.getloadavg()`): {load_text(report['load_average_start'])} at the "
           f"start, {load_text(report['load_average_end'])} at the end.\n")


def _dora_markdown(report: dict) -> Iterator[str]:
    config, ratios = report["config"], report["ratios"]
    w, goal = config["workload"], ratios["goal"]
    over_base = ratios["over_" + DORA_BASELINE]
    yield "# DoRA against plain LoRA: one training step, lora_jax, lora_torch and PEFT\n"
    yield from run_header_lines(report)
    yield (f"Timing: {report['warmup']} warm-up steps each, then {report['steps']} interleaved rounds "
           "(one step of every implementation per round, rotating order). Tokens/s is the median with [min, max]. "
           "A ratio is the ratio of the two medians, with in brackets the range of the same ratio taken "
           "round by round (both steps of a round ran under the same load).\n")
    yield (f"\n## GPT-2 {config['preset']} ({w['n_layer']} layers, width {w['n_embd']}, random init), batch "
           f"{w['batch']} x {w['seq']}, {w['dtype']}, r=16 alpha 32 on c_attn/c_proj/c_fc, AdamW\n")
    if goal["met"] is None:
        yield f"Goal {goal['implementation']} >= {goal['at_least']}x {goal['baseline']}: not measured in this run.\n"
    else:
        reached = over_base[goal["implementation"]]
        yield (f"Goal {goal['implementation']} >= {goal['at_least']}x {goal['baseline']} (PEFT DoRA eager): "
               f"**{'met' if goal['met'] else 'not met'}**, {goal['median_ratio']:.2f}x "
               f"(round by round [{reached['round_min']:.2f}, {reached['round_max']:.2f}]).\n")
    yield ("| implementation | framework | training | tokens/s median [min, max] | step ms | DoRA / plain | "
           "x PEFT DoRA eager | GFLOP/step analytic | GFLOP/s | peak RSS in step MB | warm-up s |")
    yield "|---|---|---|---|---|---|---|---|---|---|---|"
    for r in config["results"]:
        yield (f"| {r['name']} | {r['framework']} | {r['training']} | {r['tokens_per_s_median']:.0f} "
               f"[{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | {1000 * r['step_s_median']:.0f} | "
               f"{_fmt_ratio(ratios['dora_over_plain'].get(r['name']))} | {_fmt_ratio(over_base.get(r['name']))} | "
               f"{r['flops_per_step'] / 1e9:.1f} | {_fmt(r.get('achieved_gflops'))} | {_fmt(r.get('peak_rss_mb'))} | "
               f"{r['warmup_s']:.1f} |")
    if config["skipped"]:
        yield f"\nSkipped (not installed): {', '.join(config['skipped'])}.\n"
    yield ("\nDoRA / plain divides a DoRA row by the plain LoRA row of the same framework (jax_dora / jax_lora, "
           "torch_dora / torch_lora, peft_dora / peft). The JAX rows use the chunked LM-head loss "
           f"(`lm_loss(model, chunk_size={w['chunk_size']})`); the torch rows compute full float32 logits, as users run them. "
           "The analytic FLOP count (`analytic_flops` in examples/benchmark_steps.py) adds DoRA's per-step "
           "product A B inside the detached weight norm ||W0 + s A B||; the norm's memory traffic and the "
           "factorised output's elementwise work are not FLOPs it counts. Peak RSS is the whole process "
           "(every implementation's weights stay resident); compare it across rows only.\n")


def write_dora_report(report: dict, prefix: str) -> list[str]:
    """Writes ``prefix.json`` and ``prefix.md`` (a ``benchmark_dora.py`` run) atomically; returns the paths."""
    writers = {
        ".json": lambda tmp: tmp.write_text(json.dumps(report, indent=2), encoding="utf-8"),
        ".md": lambda tmp: tmp.write_text("\n".join(_dora_markdown(report)) + "\n", encoding="utf-8"),
    }
    for ext, write in writers.items():
        with atomic_destination(prefix + ext) as tmp:
            write(tmp)
    return [prefix + ext for ext in writers]
