"""Where a lora_jax training step spends its time on CPU: a ``jax.profiler`` trace, each op put in a part.

The step is ``compare_implementations.py``'s ``jax_lora`` step (``make_train_step`` on ``lm_loss``). After
warm-up, ``--steps`` steps run under ``jax.profiler``; every executed HLO op of the trace is looked up in
the compiled HLO, whose metadata holds the JAX name stack (``jvp(GPT2.hidden)/transformer/h/3/mlp/c_fc``)
and whose fused computations show each dot's operand shapes. Each op goes to one part:

- ``lm_head_ce``: the tied LM head (``wte.attend``'s dots, or the chunked loss) and the cross-entropy;
- ``lora``: a dot with a rank-sized operand axis (``x A``, ``(x A) B`` and their gradients);
- ``block_matmuls``: the other dots of ``c_attn``, ``c_proj`` and ``c_fc``;
- ``attention``: the rest of ``attn`` (scores, softmax, weighted values);
- ``ln_gelu``: layer norms and the MLP activation;
- ``optimizer``: outside the gradient (AdamW, the gradient norm, the update);
- ``other``: embeddings, residual adds, copies.

Usage (prints a table, writes JSON)::

    python examples/profile_cpu_step.py --threads 2 --out /tmp/profile.json [--chunk-size 0]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchmark_steps import CHUNK_SIZE, RANK, Workload, set_backend_environment  # noqa: E402

PARTS = ("lm_head_ce", "lora", "block_matmuls", "attention", "ln_gelu", "optimizer", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(op_name by instruction, body text by computation)`` of a compiled module's ``as_text()``."""
    names, bodies, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        header = re.match(r"^\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if current:
            bodies[current].append(line)
        op = re.search(r'op_name="([^"]*)"', m.group(2))
        names[m.group(1)] = op.group(1) if op else ""
        called = re.search(r"calls=%?([\w.\-]+)", m.group(2))
        if called:
            names[m.group(1) + "::calls"] = called.group(1)
    return names, {k: "\n".join(v) for k, v in bodies.items()}


def part_of(instruction: str, names: dict[str, str], bodies: dict[str, str], rank: int = RANK) -> str:
    """The part (one of ``PARTS``) an executed HLO instruction belongs to."""
    op = names.get(instruction, "")
    body = bodies.get(names.get(instruction + "::calls", ""), "")
    in_grad = "jvp(" in op or "transpose(" in op
    if not in_grad:
        return "optimizer"
    is_dot = " dot(" in body or "dot_general" in op
    if "GPT2" not in op or ("/wte/" in op and is_dot):  # the full-logits path's head is wte.attend, in the model
        return "lm_head_ce"
    if is_dot and re.search(rf"\[(?:\d+,)*{rank}(?:,\d+)*\]", body or op):
        return "lora"
    if re.search(r"/(c_attn|c_proj|c_fc)/", op) and is_dot:
        return "block_matmuls"
    if "/attn/" in op:
        return "attention"
    if re.search(r"/(ln_1|ln_2|ln_f)/|/mlp/", op):
        return "ln_gelu"
    return "other"


def op_times(trace_dir: str) -> dict[str, list[float]]:
    """Per HLO instruction, the durations (ms) of its executions in the trace."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and re.fullmatch(r"[\w.\-]+", e.get("name", "")):
            times[e["name"]].append(e["dur"] / 1000)
    return times


def profile(w: Workload, steps: int, chunked: bool) -> dict:
    import jax

    from benchmark_steps import _jax_step_fns

    step, init_state, batch = _jax_step_fns(w, "lora", chunked)
    trained, opt, frozen = init_state()
    rng = jax.random.key(3)
    names, bodies = parse_hlo(step.lower(trained, opt, frozen, batch, rng).compile().as_text())
    for _ in range(2):  # compile, then one step to settle
        trained, opt, metrics = step(trained, opt, frozen, batch, rng)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(steps):
            trained, opt, metrics = step(trained, opt, frozen, batch, rng)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        times = op_times(trace_dir)
    parts = collections.Counter()
    for instruction, durations in times.items():
        if instruction in names and not instruction.startswith("while"):  # a loop's time is its body's ops
            parts[part_of(instruction, names, bodies)] += sum(durations) / steps
    total = sum(parts.values())
    return {"wall_ms_per_step": 1000 * wall, "ops_ms_per_step": total, "parts_ms": {p: parts[p] for p in PARTS},
            "shares": {p: parts[p] / total for p in PARTS}, "workload": w.as_dict(), "chunked": chunked}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="LM-head chunk rows; 0: full logits")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if min(args.threads, args.layers, args.steps) < 1 or args.chunk_size < 0:
        p.error("--threads, --layers and --steps must be >= 1, --chunk-size >= 0")
    set_backend_environment("cpu", args.threads)
    w = Workload(preset="small", n_embd=768, n_layer=args.layers, n_head=12, batch=4, seq=128, dtype="float32",
                 device="cpu", chunk_size=args.chunk_size or CHUNK_SIZE)
    result = profile(w, args.steps, chunked=args.chunk_size > 0)
    result["load_average"] = os.getloadavg()
    print(f"wall {result['wall_ms_per_step']:.0f} ms/step, ops {result['ops_ms_per_step']:.0f} ms/step")
    for part in PARTS:
        print(f"  {part:14s} {result['parts_ms'][part]:8.0f} ms  {result['shares'][part]:6.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
