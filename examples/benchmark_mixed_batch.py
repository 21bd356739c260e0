"""A mixed batch over K = 4 adapters against the same batch with one adapter: lora_jax, lora_torch and PEFT.

GPT-2 small (12 layers, width 768, random init, no download), CPU, float32, LoRA r = 16 (alpha 32) on
``c_attn``, ``c_proj`` and ``c_fc``. The batch is 8 x 64 = 512 token rows (``--batch``, ``--seq``); in the
mixed batch example ``i`` uses ``(default, a1, a2, a3, __base__)[i % 5]``, so every adapter and the base
appear; the single-adapter batch runs ``default`` alone. Rows:

- forward (logits, no gradient) and training step (AdamW) for ``jax`` (``lora_apply``; ``make_train_step``
  with ``lm_loss(model, chunk_size=256)``) and ``torch`` (``lora_torch``, eager; mixed through
  ``with adapter_names(model, names)``), each on the single-adapter batch and on the mixed batch;
- ``peft`` single forward and training step, and mixed forward (``model(ids, adapter_names=names)``).
  PEFT refuses ``adapter_names`` in training mode, so it has no mixed training row;
- the mixed-batch algorithms the issue lists, as whole-model forward rows (``jax_mixed_onehot``,
  ``jax_mixed_ragged_dot``) and as a micro-benchmark of one module's branch at the same shapes:
  ``gather`` (lora_jax's ``mixed_dense_branch``: each example gathers its own A and B), ``onehot``
  (every adapter on every token, a one-hot mask keeps each example's) and ``ragged_dot`` (examples
  sorted by adapter, ``jax.lax.ragged_dot`` over the token rows, one group per adapter slot).
  Each alternative is first checked against ``gather`` (max abs difference; exit 1 beyond 1e-5 of
  the largest value), then timed. The whole-model rows swap ``lora_jax.forward.mixed_dense_branch``
  for the alternative while the forward is traced; lora_jax itself is unchanged.

Timing interleaves rows: after ``--warmup`` untimed calls each, every one of ``--repeats`` rounds runs
``--steps`` calls of each row, in a rotating order, so drifting load hits all rows alike. A ratio is
the ratio of medians, with the range of the same ratio round by round. Goals (issue 11): mixed costs at
most 1.25x single; lora_jax's mixed forward at least 2x PEFT's. On a quiet 2-core machine::

    python examples/benchmark_mixed_batch.py --threads 2 --repeats 5 --steps 1 --warmup 1

writes docs/benchmark_mixed_batch.json and .md (the markdown names the exact command of its run).
``--tiny`` runs a one-layer width-64 model (smoke test). Exit codes: 0 written, 1 an alternative disagrees
with gather, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(__file__))  # sibling modules when run as a script
# benchmark_steps imports jax and torch only inside its builders, so the environment set below still takes effect.
from benchmark_steps import ALPHA, CHUNK_SIZE, LR, RANK, TARGETS, set_backend_environment  # noqa: E402

ADAPTERS = ("default", "a1", "a2", "a3")  # K = 4; "default" is PEFT's and lora_torch's first adapter
BASE = "__base__"
SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12, vocab=50257, batch=8, seq=64),
          "tiny": dict(n_embd=64, n_layer=1, n_head=2, vocab=512, batch=5, seq=16)}
ALTERNATIVE_RTOL = 1e-5  # of the largest |value|: fp32 sums over <= 3072 terms in another order (~1e-7 seen)
BRANCH_CALLS = 10  # micro-benchmark calls per sample per --steps: one call is ~1000x shorter than a model row
FILES = ("benchmark_mixed_batch.json", "benchmark_mixed_batch.md")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad input is one line on stderr (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _OneLineParser(prog="benchmark_mixed_batch.py", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and XLA")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians and ratio ranges over these)")
    p.add_argument("--steps", type=int, default=1, help="timed calls of each row per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row (JAX rows are compiled before)")
    p.add_argument("--batch", type=int, default=None, help="examples per batch (default 8; 5 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 64; 16 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="one layer of width 64, vocabulary 512 (smoke runs)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"),
                   help="folder for benchmark_mixed_batch.json and .md (default docs/)")
    args = p.parse_args(argv)
    why = {"batch": " (one example per adapter and the base)"}
    bad = [f"--{n} must be >= {low}, got {getattr(args, n)}{why.get(n, '')}"
           for n, low in (("threads", 1), ("repeats", 1), ("steps", 1), ("warmup", 0), ("batch", len(ADAPTERS) + 1),
                          ("seq", 1)) if getattr(args, n) is not None and getattr(args, n) < low]
    if args.seq is not None and args.seq > 1024:
        bad.append(f"--seq must be <= 1024 (GPT-2's n_positions), got {args.seq}")
    if bad:
        p.error("; ".join(bad))
    if not os.path.isdir(args.out_dir):  # refused now, not after minutes of timing
        p.error(f"--out-dir {args.out_dir!r} does not exist; create it or choose another folder")
    shape = dict(SHAPES["tiny" if args.tiny else "small"])
    shape.update({k: getattr(args, k) for k in ("batch", "seq") if getattr(args, k) is not None})
    args.shape = shape
    return args


def mixed_names(batch: int) -> list[str]:
    """Example ``i`` uses ``(*ADAPTERS, "__base__")[i % 5]``, as in ``python -m parity``'s mixed stage."""
    return [(*ADAPTERS, BASE)[i % (len(ADAPTERS) + 1)] for i in range(batch)]


# ------------------------------------------------------------------ alternatives to lora_jax's gather
# Each takes mixed_dense_branch's arguments: x (B, ..., in), ids (B,), stacks a (K+1, in, r) and b (K+1, r, out)
# from lora_jax.mixed_batch.stacked_factors (slot K all zero: the base), scaling (K+1,).


def onehot_branch(x, ids, a, b, scaling, *, dtype, precision=None):
    """Every adapter on every token, ``(x [A_0..A_K]) (mask * s) [B_0..B_K]``: K+1 times the branch FLOPs."""
    import jax
    import jax.numpy as jnp

    slots = a.shape[0]
    mask = jax.nn.one_hot(ids, slots, dtype=dtype) * scaling.astype(dtype)  # (B, K+1), scale folded in
    h = jnp.einsum("b...i,kir->b...kr", x.astype(dtype), a.astype(dtype), precision=precision)  # (B, ..., K+1, r)
    h = h * mask.reshape((ids.shape[0],) + (1,) * (x.ndim - 2) + (slots, 1))
    return jnp.einsum("b...kr,kro->b...o", h, b.astype(dtype), precision=precision)


def ragged_branch(x, ids, a, b, scaling, *, dtype, precision=None):
    """Examples sorted by adapter; ``jax.lax.ragged_dot`` over the token rows, group ``k`` = adapter ``k``'s rows."""
    import jax
    import jax.numpy as jnp

    order = jnp.argsort(ids, stable=True)
    rows_per_example = math.prod(x.shape[1:-1])
    xs = x[order].astype(dtype).reshape(-1, x.shape[-1])  # (B*T, in), adapter by adapter
    sizes = (jnp.bincount(ids, length=a.shape[0]) * rows_per_example).astype(jnp.int32)
    h = jax.lax.ragged_dot(xs, a.astype(dtype), sizes, precision=precision)  # (B*T, r)
    out = jax.lax.ragged_dot(h, b.astype(dtype), sizes, precision=precision)  # (B*T, out)
    out = out.reshape(x.shape[:-1] + (b.shape[-1],))
    out = out * scaling.astype(dtype)[ids[order]].reshape((-1,) + (1,) * (x.ndim - 1))
    return out[jnp.argsort(order)]  # back to batch order


def alternatives() -> dict[str, Callable]:
    from lora_jax.mixed_batch import mixed_dense_branch

    return {"gather": mixed_dense_branch, "onehot": onehot_branch, "ragged_dot": ragged_branch}


@contextlib.contextmanager
def mixed_branch(fn: Callable) -> Iterator[None]:
    """Inside the block (while tracing), lora_jax's mixed forward computes each module's branch with ``fn``."""
    import lora_jax.forward as forward

    saved = forward.mixed_dense_branch
    forward.mixed_dense_branch = fn
    try:
        yield
    finally:
        forward.mixed_dense_branch = saved


def _max_rel_diff(value, reference) -> dict:
    import numpy as np

    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    diff, scale = float(np.abs(value - reference).max()), float(np.abs(reference).max())
    return {"max_abs_diff": diff, "reference_max_abs": scale, "rel_to_max": diff / scale}


def disagreements(checks: dict[str, dict]) -> list[str]:
    """The checks whose difference from gather exceeds ``ALTERNATIVE_RTOL`` of the largest value (NaN included)."""
    return [f"{k} ({v['rel_to_max']:.1e})" for k, v in checks.items() if not v["rel_to_max"] <= ALTERNATIVE_RTOL]


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))


# ------------------------------------------------------------------------------------------ rows


class Row(NamedTuple):
    """One timed thing: ``call()`` runs it once and waits for the result; ``info`` collects its facts."""

    name: str
    framework: str  # "jax", "torch", "peft", or "branch:<module>" in the micro-benchmark
    kind: str  # "forward", "train", or the micro-benchmark's method
    batch: str  # "single" or "mixed"
    call: Callable[[], None]
    info: dict


def _nonzero_b(adapter, key):
    """``adapter`` with every ``lora_B`` drawn from N(0, 0.02^2): with B = 0 the checks would prove nothing."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten_with_path(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                               if "lora_B" in jax.tree_util.keystr(p) else x
                                               for (p, x), k in zip(leaves, keys)])


def jax_rows(shape: dict) -> tuple[list[Row], dict]:
    """Forward and training rows of lora_jax, single and mixed, plus the alternatives' forward rows."""
    import jax
    import optax

    from lora_jax import AdapterSet, Batch, LoraConfig, init_lora, lm_loss, lora_apply, make_train_step
    from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params

    config = GPT2Config(vocab_size=shape["vocab"], n_positions=1024, n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"])
    model, params = GPT2(config), init_gpt2_params(config, jax.random.key(0))
    lora = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    members = {name: _nonzero_b(init_lora(params, lora, jax.random.key(10 + k)), jax.random.key(20 + k))
               for k, name in enumerate(ADAPTERS)}
    adapters = AdapterSet(members)
    ids = jax.random.randint(jax.random.key(1), (shape["batch"], shape["seq"]), 0, shape["vocab"])
    example_ids = adapters.example_ids(mixed_names(shape["batch"]))
    rows, checks = [], {}

    def forward_row(name: str, batch: str, adapter, names=None) -> tuple[Row, Callable]:
        # A new function each time: jit's trace cache would otherwise hand an alternative gather's trace.
        compiled = jax.jit(lora_apply(model.apply)).lower(params, adapter, ids, adapter_names=names).compile()
        return Row(name, "jax", "forward", batch, lambda: compiled(params, adapter, ids, adapter_names=names)
                   .block_until_ready(), {"xla_flops": _flops(compiled)}), compiled

    single, _ = forward_row("jax_single", "single", members["default"])
    mixed, gather = forward_row("jax_mixed", "mixed", adapters, example_ids)
    reference = gather(params, adapters, ids, adapter_names=example_ids)
    base = jax.jit(lora_apply(model.apply)).lower(params, None, ids).compile()(params, None, ids)
    effect = float(abs(reference - base).max())  # what the adapters move: the agreement below must be far smaller
    rows += [single, mixed]
    for alt, fn in alternatives().items():
        if alt == "gather":
            continue
        with mixed_branch(fn):  # traced and compiled inside: the compiled forward keeps the alternative
            row, compiled = forward_row(f"jax_mixed_{alt}", "mixed", adapters, example_ids)
        checks[row.name] = {**_max_rel_diff(compiled(params, adapters, ids, adapter_names=example_ids), reference),
                            "adapters_move_logits_by": effect}
        rows.append(row)
    step = make_train_step(lm_loss(model, chunk_size=min(CHUNK_SIZE, shape["batch"] * shape["seq"])), optax.adamw(LR))
    for batch, trained, names in (("single", members["default"], None), ("mixed", adapters, example_ids)):
        data = Batch(ids, adapter_ids=names)
        state = [jax.tree_util.tree_map(lambda x: x.copy(), trained)]
        state.append(optax.adamw(LR).init(state[0]))
        compiled = step.lower(state[0], state[1], params, data, jax.random.key(3)).compile()

        def run(state=state, compiled=compiled, data=data) -> None:
            state[0], state[1], metrics = compiled(state[0], state[1], params, data, jax.random.key(3))
            jax.block_until_ready((state[0], metrics["loss"]))

        rows.append(Row(f"jax_{batch}", "jax", "train", batch, run, {"xla_flops": _flops(compiled)}))
    return rows, checks


def torch_rows(shape: dict) -> list[Row]:
    """lora_torch (one adapter; four) and PEFT (four, one active or mixed) on transformers' GPT-2, eager."""
    import peft
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_torch import add_adapter, adapter_names, freeze_base_model, inject_lora, unfreeze_lora_parameters

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=shape["vocab"], n_embd=shape["n_embd"], n_layer=shape["n_layer"],
                                          n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    names = mixed_names(shape["batch"])
    single = freeze_base_model(inject_lora(gpt2(), TARGETS, rank=RANK, lora_alpha=ALPHA, verbose=False))
    mixed = freeze_base_model(inject_lora(gpt2(), TARGETS, rank=RANK, lora_alpha=ALPHA, verbose=False))
    for name in ADAPTERS[1:]:
        add_adapter(mixed, name, TARGETS, rank=RANK, lora_alpha=ALPHA, verbose=False)
    unfreeze_lora_parameters(mixed)  # a mixed training step trains every adapter on its own examples
    config = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True,
                  bias="none", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(gpt2(), peft.LoraConfig(**config))
    for name in ADAPTERS[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**config))
    theirs.set_adapter("default")  # single rows: one active adapter, the only trainable one (PEFT's rule)

    def forward(model, names=None) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.no_grad():
                if model is theirs:
                    model(ids, **({"adapter_names": names} if names else {}))
                else:
                    with adapter_names(model, names) if names else contextlib.nullcontext():
                        model(ids)
        return run

    def train(model, names=None) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=1e-4)

        def run() -> None:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with adapter_names(model, names) if names else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
        return run

    return [Row("torch_single", "torch", "forward", "single", forward(single), {}),
            Row("torch_mixed", "torch", "forward", "mixed", forward(mixed, names), {}),
            Row("peft_single", "peft", "forward", "single", forward(theirs), {}),
            Row("peft_mixed", "peft", "forward", "mixed", forward(theirs, names), {}),
            Row("torch_single", "torch", "train", "single", train(single), {}),
            Row("torch_mixed", "torch", "train", "mixed", train(mixed, names), {}),
            Row("peft_single", "peft", "train", "single", train(theirs), {})]


def branch_rows(shape: dict) -> tuple[list[Row], dict]:
    """One module's branch at the model's shapes: the base matmul, one adapter, and each mixed algorithm."""
    import jax
    import jax.numpy as jnp

    d, k = shape["n_embd"], len(ADAPTERS)
    ids = jnp.asarray([(*range(k), k)[i % (k + 1)] for i in range(shape["batch"])], jnp.int32)
    scaling = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0], jnp.float32)  # distinct scales, so a mixed-up one shows
    rows, checks = [], {}
    for m, (module, (fan_in, fan_out)) in enumerate({"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
                                                     "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}.items()):
        keys = jax.random.split(jax.random.key(100 + m), 4)
        x = jax.random.normal(keys[0], (shape["batch"], shape["seq"], fan_in))
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(keys[1], (k + 1, fan_in, RANK), minval=-bound, maxval=bound).at[k].set(0)
        b = (0.02 * jax.random.normal(keys[2], (k + 1, RANK, fan_out))).at[k].set(0)
        w0 = 0.02 * jax.random.normal(keys[3], (fan_in, fan_out))
        fns = {"base_matmul": lambda x, ids, a, b, s, w0: x @ w0,
               "single": lambda x, ids, a, b, s, w0: ((x @ a[0]) @ b[0]) * s[0]}
        fns.update({alt: (lambda fn: lambda x, ids, a, b, s, w0: fn(x, ids, a, b, s, dtype=jnp.float32))(fn)
                    for alt, fn in alternatives().items()})
        args = (x, ids, a, b, scaling, w0)
        reference = None
        for method, fn in fns.items():
            compiled = jax.jit(fn).lower(*args).compile()
            if method == "gather":
                reference = compiled(*args)
            elif reference is not None:
                checks[f"{module}:{method}"] = _max_rel_diff(compiled(*args), reference)
            rows.append(Row(f"{module}:{method}", f"branch:{module}", method, "mixed", lambda c=compiled, args=args: [
                c(*args).block_until_ready() for _ in range(BRANCH_CALLS)],
                {"xla_flops": _flops(compiled), "calls_per_sample": BRANCH_CALLS, "shape": [fan_in, fan_out]}))
    return rows, checks


# ---------------------------------------------------------------------------------------- timing


def run_rounds(rows: list[Row], repeats: int, steps: int, warmup: int) -> dict[int, list[float]]:
    """Seconds per call of each row (index into ``rows``), one value per round; rows interleaved, order rotating."""
    from tqdm import tqdm

    times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    with tqdm(total=len(rows) * (warmup + repeats * steps), desc="mixed-batch benchmark", unit="call") as bar:
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            for _ in range(warmup):
                row.call()
                bar.update()
            row.info["warmup_s"] = time.perf_counter() - t0
        for r in range(repeats):
            for i in [*range(r % len(rows), len(rows)), *range(r % len(rows))]:
                t0 = time.perf_counter()
                for _ in range(steps):
                    rows[i].call()
                    bar.update()
                times[i].append((time.perf_counter() - t0) / steps / rows[i].info.get("calls_per_sample", 1))
    return times


def summarize(row: Row, seconds: list[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {"name": row.name, "framework": row.framework, "kind": row.kind, "batch": row.batch,
            "s_median": median, "s_all": seconds, "tokens_per_s_median": tokens / median,
            "tokens_per_s_min": tokens / max(seconds), "tokens_per_s_max": tokens / min(seconds), **row.info}


def cost_ratio(row: dict, baseline: dict) -> dict:
    """``row``'s time over ``baseline``'s: the ratio of medians, and its range round by round (same load)."""
    per_round = [t / b for t, b in zip(row["s_all"], baseline["s_all"])]
    return {"median_ratio": row["s_median"] / baseline["s_median"], "round_min": min(per_round),
            "round_max": max(per_round)}


def ratios(results: list[dict]) -> dict:
    """Mixed / single cost per framework and pass, jax mixed forward against PEFT's, alternatives against gather."""
    by = {(r["name"], r["kind"]): r for r in results}
    out = {"mixed_cost_over_single": {}, "alternative_cost_over_gather": {}, "branch_cost": {}}
    for framework in ("jax", "torch", "peft"):
        for kind in ("forward", "train"):
            pair = by.get((f"{framework}_mixed", kind)), by.get((f"{framework}_single", kind))
            if all(pair):
                out["mixed_cost_over_single"][f"{framework} {kind}"] = cost_ratio(*pair)
    for (name, kind), row in by.items():
        if name.startswith("jax_mixed_"):
            out["alternative_cost_over_gather"][name] = cost_ratio(row, by[("jax_mixed", "forward")])
    peft, jax_mixed = by.get(("peft_mixed", "forward")), by[("jax_mixed", "forward")]
    out["jax_mixed_speed_over_peft_mixed"] = cost_ratio(peft, jax_mixed) if peft else None
    branch = [r for r in results if r["framework"].startswith("branch:")]
    for r in branch:
        module = r["framework"].removeprefix("branch:")
        out["branch_cost"][r["name"]] = {"over_single": cost_ratio(r, by[(f"{module}:single", "single")]),
                                         "over_gather": cost_ratio(r, by[(f"{module}:gather", "gather")])}
    methods = list(dict.fromkeys(r["kind"] for r in branch))
    out["branch_layer_s"] = {m: sum(r["s_median"] for r in branch if r["kind"] == m) for m in methods}
    mixed_methods = [m for m in methods if m in alternatives()]
    whole = {"gather": jax_mixed["s_median"], **{n.removeprefix("jax_mixed_"): by[(n, "forward")]["s_median"]
                                                 for n in out["alternative_cost_over_gather"]}}
    out["fastest"] = {"branch": min(mixed_methods, key=out["branch_layer_s"].get) if mixed_methods else None,
                      "whole_model_forward": min(whole, key=whole.get)}
    cost = [out["mixed_cost_over_single"].get(f"jax {k}") for k in ("forward", "train")]
    speed = out["jax_mixed_speed_over_peft_mixed"]
    out["goals"] = {"mixed_at_most_1.25x_single": all(c and c["median_ratio"] <= 1.25 for c in cost),
                    "jax_mixed_at_least_2x_peft_mixed": None if speed is None else speed["median_ratio"] >= 2.0}
    return out


# ---------------------------------------------------------------------------------------- report


def _r(ratio: dict | None) -> str:
    return "-" if ratio is None else f"{ratio['median_ratio']:.2f} [{ratio['round_min']:.2f}, {ratio['round_max']:.2f}]"


def markdown(report: dict) -> Iterator[str]:
    m, s, rat, goals = report["machine"], report["shape"], report["ratios"], report["ratios"]["goals"]
    yield "# Mixed batches: K = 4 adapters in one batch against one adapter, lora_jax, lora_torch and PEFT\n"
    before = report["load_average_start"][0]  # the end's load includes this benchmark's own threads
    if before > 0.5 * m["threads"]:
        yield (f"**Preliminary: measured under load** (1-min load average {before:.2f} at the start on "
               f"{m['threads']} threads: other processes shared the cores). Rerun the command below on a quiet "
               "machine.\n")
    from benchmark_report import run_header_lines

    yield from run_header_lines(report)
    yield (f"Workload: GPT-2 ({s['n_layer']} layers, width {s['n_embd']}, vocabulary {s['vocab']}, random init), "
           f"batch {s['batch']} x {s['seq']}, float32, r={RANK} alpha {ALPHA:g} on {'/'.join(TARGETS)}. Mixed "
           f"batch: example i uses `{report['names']}`[i]. Single: every example uses `default`.\n")
    yield (f"Timing: {report['warmup']} warm-up call(s) per row, then {report['repeats']} interleaved rounds of "
           f"{report['steps']} call(s) per row, rotating order. Tokens/s is the median with [min, max]; a ratio "
           "is the ratio of medians with, in brackets, its range round by round.\n")
    c = rat["mixed_cost_over_single"]
    yield "\n## Goals (issue 11)\n"
    yield (f"- Mixed batch costs at most 1.25x the single-adapter batch (lora_jax): **"
           f"{'met' if goals['mixed_at_most_1.25x_single'] else 'not met'}**: forward {_r(c.get('jax forward'))}x, "
           f"training step {_r(c.get('jax train'))}x. lora_torch: forward {_r(c.get('torch forward'))}x, training "
           f"{_r(c.get('torch train'))}x; PEFT forward {_r(c.get('peft forward'))}x.")
    speed = rat["jax_mixed_speed_over_peft_mixed"]
    verdict = "not measured" if goals["jax_mixed_at_least_2x_peft_mixed"] is None else (
        "met" if goals["jax_mixed_at_least_2x_peft_mixed"] else "not met")
    yield f"- lora_jax's mixed forward at least 2x PEFT's mixed forward: **{verdict}**: {_r(speed)}x.\n"
    yield "\n## Model rows\n"
    yield "| row | pass | batch | tokens/s median [min, max] | ms | mixed / single cost | XLA GFLOP | warm-up s |"
    yield "|---|---|---|---|---|---|---|---|"
    for r in report["results"]:
        if r["framework"].startswith("branch:"):
            continue
        pair = c.get(f"{r['framework']} {r['kind']}") if r["batch"] == "mixed" and r["name"].count("_") == 1 else None
        pair = rat["alternative_cost_over_gather"].get(r["name"], pair)
        flops = f"{r['xla_flops'] / 1e9:.1f}" if r.get("xla_flops") else "-"
        yield (f"| {r['name']} | {r['kind']} | {r['batch']} | {r['tokens_per_s_median']:.0f} "
               f"[{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | {1000 * r['s_median']:.0f} | "
               f"{_r(pair)} | {flops} | {r['warmup_s']:.1f} |")
    yield ("\nPEFT refuses `adapter_names` in training mode (\"Cannot pass adapter_names when the model is in "
           "training mode\"), so PEFT has no mixed training row. The mixed / single column of `jax_mixed_onehot` and "
           "`jax_mixed_ragged_dot` is their cost over `jax_mixed` (gather). XLA's FLOP count undercounts the chunked "
           "loss of the training rows (its scan body is counted once).\n")
    yield "\n## Mixed-batch algorithms\n"
    yield (f"Agreement with gather, checked before timing (relative to the largest |value|, tolerance "
           f"{ALTERNATIVE_RTOL:g}): " + "; ".join(f"{k} {v['max_abs_diff']:.1e} ({v['rel_to_max']:.1e})"
                                                 for k, v in report["checks"].items()) + ".\n")
    yield (f"One module's branch alone ({s['batch']} x {s['seq']} token rows, r={RANK}, K = 4 adapters + base), "
           "microseconds per call, and the cost against one adapter's branch and against gather; `base_matmul` "
           "is the frozen x W0 the branch is added to:\n")
    yield "| module | method | us per call median [min, max] | x single | x gather | XLA MFLOP |"
    yield "|---|---|---|---|---|---|"
    for r in report["results"]:
        if r["framework"].startswith("branch:"):
            b = rat["branch_cost"][r["name"]]
            yield (f"| {r['framework'].removeprefix('branch:')} | {r['kind']} | {1e6 * r['s_median']:.0f} "
                   f"[{1e6 * min(r['s_all']):.0f}, {1e6 * max(r['s_all']):.0f}] | {_r(b['over_single'])} | "
                   f"{_r(b['over_gather'])} | {r['xla_flops'] / 1e6:.1f} |")
    layer = ", ".join(f"{k} {1e6 * v:.0f}" for k, v in rat["branch_layer_s"].items())
    yield f"\nSum over the four modules (one layer), us: {layer}.\n"
    fastest = rat["fastest"]
    # Only an alternative faster than gather in every round (same load) counts as faster.
    better = [f"{n.removeprefix('jax_mixed_')} ({_r(r)}x gather's time)"
              for n, r in rat["alternative_cost_over_gather"].items() if r["round_max"] < 1.0]
    yield (f"Fastest mixed algorithm on this CPU (medians): **{fastest['branch']}** for the branches alone, "
           f"**{fastest['whole_model_forward']}** in the whole-model forward. "
           + (f"Faster than gather in every round of the whole-model forward: {', '.join(better)}; confirm on a "
              "quiet machine before changing lora_jax." if better else "No alternative beat gather in every round "
              "of the whole-model forward, so lora_jax's gather stays."))
    yield ("\nOn CPU, jax lowers `ragged_dot` to a dense contraction over every group with a mask (see its XLA FLOP "
           "count), so grouping computes every adapter on every row, like the one-hot contraction.\n")


def write(report: dict, out_dir: str) -> list[str]:
    """Writes the JSON and the markdown, each atomically; returns their paths."""
    from lora_format.atomic import atomic_destination

    paths = [os.path.join(out_dir, name) for name in FILES]
    texts = [json.dumps(report, indent=2), "\n".join(markdown(report)) + "\n"]
    for path, text in zip(paths, texts):
        with atomic_destination(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    set_backend_environment("cpu", ARGS.threads)  # before jax is first imported


def main(args: argparse.Namespace) -> int:
    load_start = list(os.getloadavg())
    from benchmark_report import machine_info

    shape = args.shape
    rows, checks = jax_rows(shape)
    branches, branch_checks = branch_rows(shape)
    checks.update(branch_checks)
    failed = disagreements(checks)
    if failed:
        print(f"error: alternatives disagree with lora_jax's gather beyond {ALTERNATIVE_RTOL:g}: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    rows += torch_rows(shape) + branches
    times = run_rounds(rows, args.repeats, args.steps, args.warmup)
    tokens = shape["batch"] * shape["seq"]
    results = [summarize(row, times[i], tokens) for i, row in enumerate(rows)]
    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info("cpu", args.threads),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
        "shape": shape, "names": mixed_names(shape["batch"]), "checks": checks, "results": results,
        "ratios": ratios(results),
    }
    for path in write(report, os.path.normpath(args.out_dir)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
