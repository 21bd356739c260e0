"""QLoRA's training step: memory (XLA memory analysis) and CPU speed against PEFT + bitsandbytes, in one run.

**Memory**, compile only, GPT-2 small and XL shapes (nothing of XL's size is allocated: every input is a
``jax.ShapeDtypeStruct``, the NF4 base an ``NF4Tensor`` of them with the leaf shapes ``quantize_params``
gives): XLA's argument / output / temporary bytes of the QLoRA step (NF4 base, double quantization, plus
a float32 adapter and AdamW state) against the float32 LoRA step (float32 base, same adapter and state),
the bytes per quantized parameter (the NF4 kernels alone, compiled as arguments), and the extra
temporaries (the dequantized kernels live there).

**Speed**, CPU, GPT-2 small (random init, saved with ``save_pretrained`` and loaded from that directory
by both sides), float32 compute, interleaved rounds, one timing sample per implementation per round:

- ``jax_qlora``: ``lora_jax`` on ``quantize_params(params)``, the chunked LM-head loss;
- ``peft_qlora``: transformers' GPT-2 loaded in 4 bits (``BitsAndBytesConfig`` NF4, double quant, compute
  float32, ``device_map="cpu"``) with PEFT LoRA on top, eager, full float32 logits;
- ``jax_lora``: ``lora_jax`` on the float32 params, as ``jax_qlora`` otherwise.

All rows: r=16, alpha 32 on ``c_attn``, ``c_proj`` and ``c_fc``, AdamW (lr 1e-4, weight decay 1e-4),
batch 4 x 128. Goals: bytes per quantized parameter <= 0.52; XL whole state (step arguments) QLoRA /
fp32 LoRA <= 0.2; ``jax_qlora`` >= 1.5x ``peft_qlora``; ``jax_qlora`` at most 1.3x slower than
``jax_lora``. The report records the load average at the start and end; a start above 2.5 marks it
preliminary::

    python examples/benchmark_qlora.py --threads 2 --repeats 10 --warmup 2

writes docs/benchmark_qlora.json and docs/benchmark_qlora.md. ``--tiny`` shrinks every workload (a
2-layer, width-64 GPT-2) for tests. Exit codes: 0 written, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))  # sibling modules when run as a script
# benchmark_steps imports jax and torch only inside its builders, so the environment set below still takes effect.
from benchmark_steps import CHUNK_SIZE, set_backend_environment  # noqa: E402

PRESETS = {"small": dict(n_embd=768, n_layer=12, n_head=12), "xl": dict(n_embd=1600, n_layer=48, n_head=25)}
TINY = dict(n_embd=64, n_layer=2, n_head=2, vocab=256, n_positions=64)
PARTS = ("memory", "speed")
LOAD_LIMIT = 2.5  # a 1-minute load average above this at the start marks the run preliminary
REPORT_NAME = "benchmark_qlora"
GOALS = {"bytes_per_param": 0.52, "xl_state_ratio": 0.2, "qlora_over_peft": 1.5, "qlora_slowdown": 1.3}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad input is one line on stderr (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _names(text: str, allowed: tuple[str, ...], flag: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"{flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _OneLineParser(prog="benchmark_qlora.py", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and XLA")
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds (one sample of each step per round)")
    p.add_argument("--steps", type=int, default=1, help="training steps per timing sample")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation (compilation)")
    p.add_argument("--configs", default=None, help="memory shapes, comma-separated: small,xl (default both)")
    p.add_argument("--parts", default=",".join(PARTS), help="what to run, comma-separated: memory,speed")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="token rows per LM-head chunk (jax rows)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 GPT-2, batch 2 x 16 (tests)")
    p.add_argument("--out-dir", default=None, help="folder for benchmark_qlora.{json,md} (default docs/)")
    args = p.parse_args(argv)
    too_small = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}"
                 for n in ("threads", "repeats", "steps", "warmup", "chunk_size") if getattr(args, n) < 1]
    if too_small:
        p.error("; ".join(too_small))
    if args.tiny and args.configs is not None:
        p.error("--tiny replaces the memory shapes with one tiny GPT-2; drop --configs or --tiny")
    args.configs = ["tiny"] if args.tiny else _names(args.configs or "small,xl", tuple(PRESETS), "--configs", p)
    args.parts = _names(args.parts, PARTS, "--parts", p)
    args.out_dir = os.path.abspath(args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                                "docs"))
    if not os.path.isdir(args.out_dir):  # refused now, not after minutes of compiling
        p.error(f"--out-dir {args.out_dir!r} does not exist; create it or choose another folder")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    set_backend_environment("cpu", ARGS.threads)  # before jax is first imported


def workload(preset: str, tiny: bool, chunk_size: int):
    """The ``benchmark_steps.Workload`` of a preset (``"tiny"``: a 2-layer GPT-2, batch 2 x 16)."""
    from benchmark_steps import Workload

    if tiny:
        return Workload(preset="tiny", batch=2, seq=16, dtype="float32", device="cpu", chunk_size=chunk_size, **TINY)
    return Workload(preset=preset, batch=4, seq=128, dtype="float32", device="cpu", chunk_size=chunk_size,
                    **PRESETS[preset])


# ---------------------------------------------------------------------------------------------- memory


def abstract_quantized(params: Any, block_size: int = 64) -> Any:
    """What ``lora_jax.quantize_params(params)`` returns, for ``jax.ShapeDtypeStruct`` leaves (double quant).

    Every 2-D ``kernel`` (in, out) becomes an ``NF4Tensor`` of its transpose, whose leaves are
    ``codes`` uint8 ``ceil(n / 2)``, ``absmax`` uint8 one per block, ``nested_absmax`` float32 one per
    256 blocks and ``offset`` a float32 scalar (``lora_jax/nf4.py``); everything else is kept.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax.nf4 import NESTED_BLOCK_SIZE, NF4Tensor

    def nf4(kernel) -> NF4Tensor:
        n = int(np.prod(kernel.shape))
        blocks = -(n // -block_size)
        leaf = jax.ShapeDtypeStruct
        return NF4Tensor(codes=leaf((-(n // -2),), jnp.uint8), absmax=leaf((blocks,), jnp.uint8),
                         nested_absmax=leaf((-(blocks // -NESTED_BLOCK_SIZE),), jnp.float32),
                         offset=leaf((), jnp.float32), shape=(kernel.shape[1], kernel.shape[0]),
                         dtype=np.dtype(kernel.dtype), block_size=block_size)

    return {key: nf4(value) if key == "kernel" and len(value.shape) == 2
            else abstract_quantized(value, block_size) if isinstance(value, Mapping) else value
            for key, value in params.items()}


def _nbytes(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def _plan(compiled) -> dict[str, int]:
    """XLA's memory plan in bytes; peak = arguments + outputs + temporaries - aliased (donated)."""
    mem = compiled.memory_analysis()
    plan = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
            "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes}
    plan["peak"] = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
    return plan


def memory_row(w) -> dict:
    """Compile-only memory of the float32 LoRA step and the QLoRA step for workload ``w``."""
    import jax
    import jax.numpy as jnp
    import optax

    from benchmark_steps import ALPHA, LR, RANK, TARGETS
    from lora_jax import Batch, LoraConfig, NF4Tensor, init_lora, lm_loss, make_train_step
    from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params

    config = GPT2Config(vocab_size=w.vocab, n_positions=w.n_positions, n_embd=w.n_embd, n_layer=w.n_layer,
                        n_head=w.n_head)
    params = jax.eval_shape(lambda: init_gpt2_params(config, jax.random.key(0)))
    lora_config = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    adapter = jax.eval_shape(lambda p: init_lora(p, lora_config, jax.random.key(2)), params)
    tx = optax.adamw(LR)
    opt_state = jax.eval_shape(tx.init, adapter)
    step = make_train_step(lm_loss(GPT2(config), chunk_size=w.chunk_size), tx, donate=True)
    batch, rng = Batch(jax.ShapeDtypeStruct((w.batch, w.seq), jnp.int32)), jax.eval_shape(lambda: jax.random.key(3))
    quantized = abstract_quantized(params)
    row = {"preset": w.preset, "workload": w.as_dict(), "params": sum(int(x.size) for x in jax.tree.leaves(params)),
           "state": {}, "xla": {}}
    for kind, frozen in (("lora", params), ("qlora", quantized)):
        t0 = time.perf_counter()
        row["xla"][kind] = _plan(step.lower(adapter, opt_state, frozen, batch, rng).compile())
        row["xla"][kind]["compile_s"] = time.perf_counter() - t0
        row["state"][kind] = {"base": _nbytes(frozen), "adapter": _nbytes(adapter), "optimizer": _nbytes(opt_state)}
    is_nf4 = lambda leaf: isinstance(leaf, NF4Tensor)  # noqa: E731
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(quantized, is_leaf=is_nf4) if is_nf4(leaf)]
    row["quantized_params"] = sum(k.size for k in kernels)
    # The NF4 kernels alone, as XLA allocates them when they are a program's arguments.
    row["nf4_argument_bytes"] = _plan(jax.jit(lambda t: t).lower(kernels).compile())["argument"]
    row["bytes_per_quantized_param"] = row["nf4_argument_bytes"] / row["quantized_params"]
    lora, qlora = row["xla"]["lora"], row["xla"]["qlora"]
    row["argument_ratio"] = qlora["argument"] / lora["argument"]
    row["peak_ratio"] = qlora["peak"] / lora["peak"]
    row["temp_extra_per_quantized_param"] = (qlora["temp"] - lora["temp"]) / row["quantized_params"]
    return row


def memory_goals(rows: list[dict]) -> dict:
    """The issue's two memory goals; the XL ratio is ``None`` (not measured) when XL was not compiled."""
    per_param = {row["preset"]: row["bytes_per_quantized_param"] for row in rows}
    xl = next((row["argument_ratio"] for row in rows if row["preset"] == "xl"), None)
    return {"bytes_per_quantized_param": {"at_most": GOALS["bytes_per_param"], "values": per_param,
                                          "met": all(v <= GOALS["bytes_per_param"] for v in per_param.values())},
            "xl_state_ratio": {"at_most": GOALS["xl_state_ratio"], "value": xl,
                               "met": None if xl is None else xl <= GOALS["xl_state_ratio"]}}


# ----------------------------------------------------------------------------------------------- speed


def save_checkpoint(w, directory: str) -> str:
    """A random-init transformers GPT-2 of ``w``'s shape, saved with ``save_pretrained`` (no dropout)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=w.vocab, n_positions=w.n_positions, n_embd=w.n_embd, n_layer=w.n_layer,
                        n_head=w.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=min(50256, w.vocab - 1), eos_token_id=min(50256, w.vocab - 1))
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def build_jax(name: str, w, checkpoint: str, quantized: bool):
    """``lora_jax``'s donated, jitted step on the checkpoint, its base NF4 (``quantize_params``) or float32."""
    import jax
    import optax

    from benchmark_steps import ALPHA, LR, RANK, TARGETS, Timed, analytic_flops, xla_memory_plan_mib
    from lora_jax import Batch, LoraConfig, init_lora, lm_loss, load_gpt2, make_train_step, quantize_params
    from lora_jax.gpt2.model import GPT2

    config, params = load_gpt2(checkpoint)
    frozen = quantize_params(params) if quantized else params
    adapter = init_lora(params, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS), jax.random.key(2))
    tx = optax.adamw(LR)
    step = make_train_step(lm_loss(GPT2(config), chunk_size=w.chunk_size), tx, donate=True)
    batch, rng = Batch(jax.random.randint(jax.random.key(1), (w.batch, w.seq), 0, w.vocab)), jax.random.key(3)
    state = {"adapter": adapter, "opt": tx.init(adapter)}
    plan = xla_memory_plan_mib(step.lower(state["adapter"], state["opt"], frozen, batch, rng).compile()) or {}
    info = {"flops_per_step": analytic_flops(w, "lora"), **{f"xla_{k}_mb": v for k, v in plan.items()}}

    def run() -> None:
        state["adapter"], state["opt"], metrics = step(state["adapter"], state["opt"], frozen, batch, rng)
        jax.block_until_ready((state["adapter"], metrics["loss"]))

    return Timed(name, "jax", "qlora" if quantized else "lora", run, info, state.clear)


def build_peft_qlora(name: str, w, checkpoint: str):
    """PEFT LoRA on transformers' 4-bit GPT-2 (bitsandbytes ``Linear4bit``, NF4, double quant, fp32 compute)."""
    import bitsandbytes as bnb
    import peft
    import torch
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    from benchmark_steps import ALPHA, LR, RANK, TARGETS, Timed, analytic_flops

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=quantization, device_map="cpu")
    # Linear4bit holds (out, in) weights, so fan_in_fan_out is off; no prepare_model_for_kbit_training, whose
    # gradient checkpointing would time a different step than the JAX rows.
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             fan_in_fan_out=False, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4, fused=True)  # optax.adamw's default wd
    ids = torch.randint(0, w.vocab, (w.batch, w.seq), generator=torch.Generator().manual_seed(1))

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    def close() -> None:
        params.clear()
        del optimizer.param_groups[:]

    linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    info = {"flops_per_step": analytic_flops(w, "lora"), "trainable_params": sum(p.numel() for p in params),
            "linear4bit_layers": linear4bit}
    return Timed(name, "torch", "qlora", run, info, close)


def time_rounds(impls: list, repeats: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step: warm-up, then ``repeats`` rounds of ``steps`` steps of each, the order rotating."""
    from tqdm import tqdm

    for impl in tqdm(impls, desc="warm-up", file=sys.stderr):
        t0 = time.perf_counter()
        for _ in range(warmup):
            impl.step()
        impl.info["warmup_s"] = time.perf_counter() - t0
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for r in tqdm(range(repeats), desc="timed rounds", file=sys.stderr):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                impl.measured_step()
            times[impl.name].append((time.perf_counter() - t0) / steps)
    return times


def _speedup(rows: dict[str, dict], fast: str, slow: str) -> dict:
    """``fast``'s tokens/s over ``slow``'s: ratio of medians, and its range round by round (same load)."""
    per_round = [s / f for f, s in zip(rows[fast]["step_s_all"], rows[slow]["step_s_all"])]
    return {"median_ratio": rows[fast]["tokens_per_s_median"] / rows[slow]["tokens_per_s_median"],
            "round_min": min(per_round), "round_max": max(per_round)}


def speed_section(w, *, repeats: int, steps: int, warmup: int) -> dict:
    """Builds the three steps on one saved checkpoint, times them interleaved, and judges the two goals."""
    from compare_implementations import summarize

    with tempfile.TemporaryDirectory(prefix="qlora_bench_") as directory:
        checkpoint = save_checkpoint(w, directory)
        impls = [build_jax("jax_qlora", w, checkpoint, quantized=True), build_peft_qlora("peft_qlora", w, checkpoint),
                 build_jax("jax_lora", w, checkpoint, quantized=False)]
        times = time_rounds(impls, repeats, steps, warmup)
    rows = {impl.name: summarize(impl, times[impl.name], w.batch * w.seq, {}) for impl in impls}
    for impl in impls:
        impl.close()
    over_peft = _speedup(rows, "jax_qlora", "peft_qlora")
    slowdown = _speedup(rows, "jax_lora", "jax_qlora")  # > 1: QLoRA slower than plain LoRA by this factor
    return {"workload": w.as_dict(), "repeats": repeats, "steps_per_sample": steps, "warmup": warmup,
            "results": list(rows.values()),
            "goals": {"qlora_over_peft": {**over_peft, "at_least": GOALS["qlora_over_peft"],
                                          "met": over_peft["median_ratio"] >= GOALS["qlora_over_peft"]},
                      "qlora_slowdown": {**slowdown, "at_most": GOALS["qlora_slowdown"],
                                         "met": slowdown["median_ratio"] <= GOALS["qlora_slowdown"]}}}


# ---------------------------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "**met**" if met else "**not met**"


def _memory_markdown(memory: dict) -> Iterator[str]:
    goals = memory["goals"]
    per_param, xl = goals["bytes_per_quantized_param"], goals["xl_state_ratio"]
    yield "\n## Memory: XLA's plan of one training step (compile only, nothing allocated)\n"
    yield from _provenance_line(memory)
    yield (f"Goal bytes per quantized parameter <= {per_param['at_most']}: {_verdict(per_param['met'])} ("
           + ", ".join(f"{k} {v:.5f}" for k, v in per_param["values"].items()) + ").\n")
    yield (f"Goal GPT-2 XL whole state (step arguments) QLoRA / fp32 LoRA <= {xl['at_most']}: "
           f"{_verdict(xl['met'])}" + ("" if xl["value"] is None else f" ({xl['value']:.4f})") + ".\n")
    for row in memory["rows"]:
        w = row["workload"]
        yield (f"\n### GPT-2 {row['preset']} ({w['n_layer']} layers, width {w['n_embd']}, {row['params']:,} "
               f"parameters, {row['quantized_params']:,} in quantized kernels), batch {w['batch']} x {w['seq']}, "
               f"float32 compute, r=16 on c_attn/c_proj/c_fc, AdamW\n")
        yield ("| step | arguments MiB | base | adapter | AdamW state | outputs | temporaries | aliased (donated) | "
               "peak | compile s |")
        yield "|---|---|---|---|---|---|---|---|---|---|"
        for kind in ("lora", "qlora"):
            x, st = row["xla"][kind], row["state"][kind]
            yield (f"| {'fp32 LoRA' if kind == 'lora' else 'QLoRA (NF4 base)'} | {_mib(x['argument'])} | "
                   f"{_mib(st['base'])} | {_mib(st['adapter'])} | {_mib(st['optimizer'])} | {_mib(x['output'])} | "
                   f"{_mib(x['temp'])} | {_mib(x['alias'])} | {_mib(x['peak'])} | {x['compile_s']:.0f} |")
        yield (f"\nNF4 kernels as XLA allocates them: {row['nf4_argument_bytes']:,} bytes, "
               f"{row['bytes_per_quantized_param']:.5f} bytes per quantized parameter. QLoRA / fp32 LoRA: "
               f"arguments {row['argument_ratio']:.4f}, peak {row['peak_ratio']:.4f}. Extra temporaries of the "
               f"QLoRA step: {row['temp_extra_per_quantized_param']:.2f} bytes per quantized parameter (4 would be "
               "every dequantized float32 kernel alive at once).\n")
    yield ("\nArguments are the step's inputs: the frozen base, the adapter, its AdamW state (two moments and a count) "
           "and the batch; base, adapter and AdamW state are their sizes from the leaf shapes. Adapter and AdamW "
           "state are donated, so the outputs that replace them are aliased. Peak = arguments + outputs + "
           "temporaries - aliased. The quantized kernels are the four Dense layers of every block, as transformers' "
           "4-bit loading picks them; the tied embedding / LM head, position embeddings, LayerNorms and biases "
           "stay float32 in both steps. Bytes per quantized parameter compiles the NF4 kernels alone as a "
           "program's arguments (codes 1/2 byte, uint8 absmax per 64 values, float32 absmax per 256 blocks and "
           "a float32 offset per kernel).\n")


def _provenance_line(section: dict) -> Iterator[str]:
    if "commit" in section:  # a part rerun on its own (a merged report) names its command
        command = f" by `{section['command']}`" if "command" in section else ""
        from benchmark_report import load_text

        load = (f"; load average {load_text(section['load_average_start'])} at the start of this part, "
                f"{load_text(section['load_average_end'])} at its end" if "load_average_start" in section else "")
        yield f"Measured at commit {section['commit']}{command}{load}.\n"


def _fmt_speedup(r: dict) -> str:
    return f"{r['median_ratio']:.2f}x (round by round [{r['round_min']:.2f}, {r['round_max']:.2f}])"


def _speed_markdown(speed: dict) -> Iterator[str]:
    w, goals = speed["workload"], speed["goals"]
    over, slow = goals["qlora_over_peft"], goals["qlora_slowdown"]
    yield (f"\n## Speed: GPT-2 {w['preset']} ({w['n_layer']} layers, width {w['n_embd']}, random init), batch "
           f"{w['batch']} x {w['seq']}, float32, r=16 alpha 32 on c_attn/c_proj/c_fc, AdamW, CPU\n")
    yield from _provenance_line(speed)
    yield (f"Timing: {speed['warmup']} warm-up steps each, then {speed['repeats']} interleaved rounds of "
           f"{speed['steps_per_sample']} step(s) of each implementation, the order rotating. Tokens/s is the median "
           "with [min, max]; a ratio is the ratio of medians, with the same ratio taken round by round.\n")
    yield f"Goal jax_qlora >= {over['at_least']}x peft_qlora: {_verdict(over['met'])}, {_fmt_speedup(over)}.\n"
    yield (f"Goal jax_qlora at most {slow['at_most']}x slower than jax_lora (step time jax_qlora / jax_lora): "
           f"{_verdict(slow['met'])}, {_fmt_speedup(slow)}.\n")
    yield "| implementation | framework | base | tokens/s median [min, max] | step ms | GFLOP/s | peak RSS in step MB | warm-up s |"
    yield "|---|---|---|---|---|---|---|---|"
    for r in speed["results"]:
        base = "NF4 (double quant)" if r["training"] == "qlora" else "float32"
        yield (f"| {r['name']} | {r['framework']} | {base} | {r['tokens_per_s_median']:.0f} "
               f"[{r['tokens_per_s_min']:.0f}, {r['tokens_per_s_max']:.0f}] | {1000 * r['step_s_median']:.0f} | "
               f"{r['achieved_gflops']:.0f} | {r['peak_rss_mb']:.0f} | {r['warmup_s']:.1f} |")
    yield (f"\nThe JAX rows use the chunked LM-head loss (`lm_loss(model, chunk_size={w['chunk_size']})`) and dequantize the NF4 "
           "kernels inside the jitted step; peft_qlora computes full float32 logits, as users run it, and its "
           "bitsandbytes `Linear4bit` layers dequantize in every forward and backward. PEFT runs without "
           "`prepare_model_for_kbit_training`, whose gradient checkpointing would time a different step. "
           "GFLOP/s uses the hand count of a LoRA step (`analytic_flops` in examples/benchmark_steps.py), "
           "which leaves dequantization out. Peak RSS is the whole process (every implementation stays "
           "resident); compare it across rows only.\n")


def qlora_markdown(report: dict) -> Iterator[str]:
    """The markdown report of a run, line by line."""
    yield "# QLoRA training step: memory and CPU speed, lora_jax against PEFT + bitsandbytes\n"
    if report["preliminary"]:
        yield (f"**Preliminary, measured under load {report['load_average_start'][0]:.2f}** (1-minute load average "
               f"at the start above {report['load_limit']}); to be rerun on a quiet machine.\n")
    from benchmark_report import run_header_lines

    yield from run_header_lines(report)
    if "memory" in report:
        yield from _memory_markdown(report["memory"])
    if "speed" in report:
        yield from _speed_markdown(report["speed"])


def write_qlora_report(report: dict, prefix: str) -> list[str]:
    """Writes ``prefix.json`` and ``prefix.md`` atomically; returns the paths."""
    import json

    from lora_torch.tensor_files import atomic_destination

    writers = {
        ".json": lambda tmp: tmp.write_text(json.dumps(report, indent=2), encoding="utf-8"),
        ".md": lambda tmp: tmp.write_text("\n".join(qlora_markdown(report)) + "\n", encoding="utf-8"),
    }
    for ext, write in writers.items():
        with atomic_destination(prefix + ext) as tmp:  # temp file beside the target, renamed on success
            write(tmp)
    return [prefix + ext for ext in writers]


def main(args: argparse.Namespace) -> int:
    load_start = list(os.getloadavg())
    from tqdm import tqdm

    from benchmark_report import machine_info

    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_info("cpu", args.threads),
        "load_average_start": load_start,
        "preliminary": load_start[0] > LOAD_LIMIT,
        "load_limit": LOAD_LIMIT,
        "tiny": args.tiny,
    }
    report["machine"]["versions"].update(_extra_versions())
    if "memory" in args.parts:
        measured = _provenance()
        presets = tqdm(args.configs, desc="memory (compile only)", file=sys.stderr)
        rows = [memory_row(workload(preset, args.tiny, args.chunk_size)) for preset in presets]
        report["memory"] = {"rows": rows, "goals": memory_goals(rows), **measured,
                            "load_average_end": list(os.getloadavg())}
    if "speed" in args.parts:
        measured = _provenance()
        report["speed"] = speed_section(workload("small", args.tiny, args.chunk_size), repeats=args.repeats,
                                        steps=args.steps, warmup=args.warmup)
        report["speed"].update(measured, load_average_end=list(os.getloadavg()))
    report["load_average_end"] = list(os.getloadavg())
    for path in write_qlora_report(report, os.path.join(args.out_dir, REPORT_NAME)):
        print("wrote", path)
    return 0


def _provenance() -> dict:
    """The commit of the code measured (``+dirty`` with local changes under lora_jax/) and the load now."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--", "lora_jax"))
    return {"commit": commit + ("+dirty" if dirty else ""), "load_average_start": list(os.getloadavg())}


def _extra_versions() -> dict[str, str]:
    import importlib.metadata

    try:
        return {"bitsandbytes": importlib.metadata.version("bitsandbytes")}
    except importlib.metadata.PackageNotFoundError:
        return {"bitsandbytes": "absent"}


if __name__ == "__main__":
    sys.exit(main(ARGS))
