"""Fine-tune GPT-2 with LoRA and optax: resumable, divergence-guarded, offline by default.

With no arguments it trains LoRA on the project's embedded base (a small GPT-2 trained once
on text every CPython ships, then cached) using a different embedded target text. It prints the
held-out loss and perplexity before and after, and the greedy continuation of a held-out prompt
by the base model and by the merged adapter side by side, so the adaptation is visible::

    python examples/train_gpt2_optax.py                       # offline default, a few minutes on 2 CPU cores
    python examples/train_gpt2_optax.py --model gpt2 --data my.txt --steps 1000
    python examples/train_gpt2_optax.py --resume              # continue from the newest intact checkpoint
    python examples/train_gpt2_optax.py --resume --lr 5e-4    # ... with a lower peak learning rate
    python examples/train_gpt2_optax.py --quantize nf4        # QLoRA: the frozen base in NF4 (docs/qlora.md)

Outputs under ``--out``: ``adapter/`` (PEFT format), ``loss.png``, ``results.json`` and
``checkpoints/step_*`` (see docs/training.md for the format and the resume rules).
Exit codes: 0 done, 1 a numerical check failed, 2 bad input, 3 divergence (non-finite values).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # sibling modules when run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lora_jax import (GPT2, Adapter, Batch, LoraConfig, dequantize_params, init_lora, lm_loss,  # noqa: E402
                      load_gpt2, load_tokenizer, make_train_step, merge, save_adapter, trainable_summary)
from lora_jax.atomic_files import atomic_write, atomic_write_text  # noqa: E402
from lora_jax.embedded.base import ensure_base, target_corpus  # noqa: E402
from lora_jax.gpt2.generation import generate  # noqa: E402
from lora_jax.gpt2.loading import resolve_model_dir  # noqa: E402
from lora_jax.training.checkpoint import CheckpointMismatchError, TrainState, latest_intact_checkpoint  # noqa: E402
from lora_jax.training.chunked_loss import DEFAULT_CHUNK_SIZE  # noqa: E402
from lora_jax.training.losses import eval_loss  # noqa: E402
from lora_jax.training.text_data import WindowSampler, heldout_windows, split_heldout  # noqa: E402
from train_guard import (EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_DIVERGED, BadInput, CheckFailed,  # noqa: E402
                         Diverged, all_finite, check_args, check_vocab, read_text)
from train_run_dir import RunDir, open_run_dir, start_state  # noqa: E402

MAX_EVAL_WINDOWS = 128  # bounds eval time on big --data files; the default held-out text is smaller
# The first 48 held-out tokens as the prompt: enough context for the small base to pick up the register.
PROMPT_TOKENS, NEW_TOKENS = 48, 48
OPTIMIZER_FLAGS = ("lr", "steps", "warmup", "weight_decay", "clip_norm", "grad_accum")
# |merged - factorized| held-out loss: fp32 rounding of x(W0 + sAB) vs xW0 + s(xA)B is ~1e-6 nats;
# bf16 computes both in 8-bit mantissas, ~1e-2.
MERGE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see docs/training.md for every flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="'gpt2', a hub id or a checkpoint dir (default: embedded base)")
    p.add_argument("--data", type=Path, default=None, help="UTF-8 text file; its last 10%% is held out")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="c_attn,c_proj", help="comma-separated module names (PEFT rule)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA branch input")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (may change on --resume)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip (may change on --resume)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps before the cosine decay")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval (each checkpoint is evaluated)")
    p.add_argument("--out", type=Path, default=Path("runs/train_gpt2_optax"))
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    start.add_argument("--overwrite", action="store_true", help="start fresh in a non-empty --out, replacing its run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=8' or 'data=4,fsdp=2'")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (params stay fp32)")
    p.add_argument("--quantize", choices=("nf4",), default=None,
                   help="QLoRA: hold the frozen base's kernels in NF4 (bitsandbytes' 4-bit NormalFloat, double quant)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    # Testing hooks, documented in docs/training.md: simulate a crash, or a divergence.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--inject-nan-at", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = check_args(args)
    if args.quantize is not None and args.mesh is not None:
        problems.append(f"--quantize {args.quantize} cannot be combined with --mesh: NF4 kernels are not sharded "
                        "yet; drop --mesh (QLoRA runs on one device) or --quantize")
    if problems:
        p.error("; ".join(problems))
    return args


def make_optimizer(*, lr: float, steps: int, warmup: int, weight_decay: float, clip_norm: float,
                   grad_accum: int) -> optax.GradientTransformation:
    """Clip, then AdamW on a warmup + cosine schedule; accumulated over ``grad_accum`` micro-batches."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps, end_value=0.1 * lr)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    # MultiSteps averages G micro-batch gradients, then applies tx once: the same update as one
    # batch G times larger, up to float rounding, since every micro-batch has the same token count.
    return optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()


@functools.lru_cache(maxsize=4)
def compiled_programs(model: GPT2, optimizer: tuple[tuple[str, Any], ...]):
    """``(tx, step_fn, eval_fn)``, cached so repeated ``main()`` calls in one process (a notebook, a
    sweep, the tests) reuse the compiled programs instead of recompiling identical ones."""
    tx = make_optimizer(**dict(optimizer))
    loss_fn = lm_loss(model, chunk_size=DEFAULT_CHUNK_SIZE)  # the (B, T, V) logits never exist
    return tx, make_train_step(loss_fn, tx), jax.jit(eval_loss(loss_fn))


def heldout_loss(eval_fn, adapter: Adapter, frozen, windows: np.ndarray, batch_size: int) -> float:
    """Token-weighted mean loss over held-out windows; the last batch is padded with masked-out rows."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        rows = windows[start:start + batch_size]
        mask = np.zeros((batch_size, windows.shape[1]), np.int32)
        mask[:len(rows)] = 1
        ids = np.pad(rows, ((0, batch_size - len(rows)), (0, 0)))  # one compiled shape for every batch
        predicted = len(rows) * (windows.shape[1] - 1)  # position t predicts t + 1
        total += float(eval_fn(adapter, frozen, Batch(ids, mask))) * predicted
        count += predicted
    return total / count


def run_config(args: argparse.Namespace, model_name: str, train_ids: np.ndarray) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint it continues (``lr``/``clip_norm`` may change)."""
    keys = ("rank", "alpha", "targets", "dropout", "lr", "weight_decay", "clip_norm", "steps", "batch_size",
            "seq_len", "grad_accum", "warmup", "seed", "dtype")
    config = {k: getattr(args, k) for k in keys}
    config["model"] = model_name
    if args.quantize is not None:  # only then: checkpoints of float runs keep resuming
        config["quantize"] = args.quantize
    config["train_tokens_sha256"] = hashlib.sha256(train_ids.tobytes()).hexdigest()
    return config


class Job(NamedTuple):
    """What the run trains on: the base, its tokenizer, the texts, the LoRA config and the run settings."""

    model_dir: Path
    model: GPT2
    frozen: Any
    tokenizer: Any
    train_ids: np.ndarray
    heldout_ids: np.ndarray
    eval_windows: np.ndarray  # (N, seq_len)
    lora_config: LoraConfig
    settings: dict[str, Any]


def _load_base(args: argparse.Namespace) -> tuple[Path, Any, Any, Any]:
    """``(model_dir, gpt2 config, params, tokenizer)``; every unusable model or tokenizer is ``BadInput``."""
    if args.model is None:
        model_dir = ensure_base(progress=not args.no_progress)
    else:
        try:
            model_dir = resolve_model_dir(args.model)
        except OSError as err:  # FileNotFoundError for a bad path, OSError for an unreachable hub id
            raise BadInput(f"--model {args.model}: {err}") from None
    try:
        # --quantize nf4 quantizes the kernels at load, deterministically, so a resumed run gets the same base.
        config, frozen = load_gpt2(model_dir, quantize=args.quantize)
    except (OSError, ValueError) as err:  # missing weights, a bad config.json, mis-shaped tensors
        raise BadInput(f"--model {model_dir}: {err}") from None
    try:
        tokenizer = load_tokenizer(model_dir)
    except Exception as err:  # noqa: BLE001 - `tokenizers` raises bare Exception for a malformed tokenizer.json
        raise BadInput(f"--model {model_dir} has no usable tokenizer ({err}); add its tokenizer.json.") from None
    return Path(model_dir), config, frozen, tokenizer


def prepare(args: argparse.Namespace) -> Job:
    """Loads the base and tokenizer, tokenises the texts, builds the LoRA config; bad input is ``BadInput``."""
    model_dir, config, frozen, tokenizer = _load_base(args)
    if args.seq_len > config.n_positions:
        raise BadInput(f"--seq-len {args.seq_len} exceeds the model's {config.n_positions} positions; lower --seq-len.")

    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)

    if args.data is None:
        train_ids, heldout_ids = (encode(t) for t in target_corpus())
    else:
        try:
            train_ids, heldout_ids = split_heldout(encode(read_text(args.data)), 0.1)
        except ValueError as err:  # too few tokens to hold any out
            raise BadInput(f"--data {args.data}: {err}") from None
    check_vocab(model_dir, config.vocab_size, tokenizer.get_vocab_size(), train_ids, heldout_ids)
    try:  # the library says the text is too short for the window length; the flags are ours to name
        windows = heldout_windows(heldout_ids, args.seq_len)[:MAX_EVAL_WINDOWS]
        WindowSampler(train_ids, args.seq_len, args.seed)
    except ValueError as err:
        raise BadInput(f"{err} Lower --seq-len (now {args.seq_len}) or pass a longer --data.") from None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        lora_config = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets)
    except ValueError as err:
        raise BadInput(f"--rank/--alpha/--dropout/--targets: {err}") from None
    model = GPT2(config, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    settings = run_config(args, str(model_dir.resolve()), train_ids)
    return Job(model_dir, model, frozen, tokenizer, train_ids, heldout_ids, windows, lora_config, settings)


def _poison(adapter: Adapter) -> Adapter:
    return jax.tree.map(lambda x: x * jnp.nan, adapter)


def train_loop(args, step_fn, state: TrainState, frozen, sampler: WindowSampler, evaluate, save,
               place_batch) -> TrainState:
    """Runs steps ``state.step + 1 .. args.steps``; a non-finite value anywhere raises ``Diverged`` before saving."""
    dropout_key = jax.random.fold_in(state.rng_key, 1)
    adapter, opt_state, seen = state.adapter, state.opt_state, state.examples_seen
    losses, evals = list(state.losses), list(state.evals)
    bar = tqdm(total=args.steps, initial=state.step, desc="lora", disable=args.no_progress, dynamic_ncols=True)
    try:
        for step in range(state.step + 1, args.steps + 1):
            if step == args.inject_nan_at:
                adapter = _poison(adapter)
            micro_losses = []
            for micro in range(args.grad_accum):
                batch = place_batch(sampler.batch(seen, args.batch_size))
                rng = jax.random.fold_in(jax.random.fold_in(dropout_key, step), micro)
                adapter, opt_state, metrics = step_fn(adapter, opt_state, frozen, batch, rng)
                seen += args.batch_size
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise Diverged(step, f"training loss {loss}, gradient norm {grad_norm}")
                micro_losses.append(loss)
            if not bool(all_finite(adapter, opt_state)):  # a finite loss can still give an overflowing update
                raise Diverged(step, "the adapter or optimizer state holds NaN or infinity after the update")
            losses.append(sum(micro_losses) / len(micro_losses))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            checkpoint = step % args.ckpt_every == 0 or step == args.steps
            if step % args.eval_every == 0 or checkpoint:  # a checkpoint is good only with a finite held-out loss
                evals.append((step, evaluate(adapter)))
                if not math.isfinite(evals[-1][1]):
                    raise Diverged(step, f"held-out loss {evals[-1][1]}")
                bar.write(f"step {step}: held-out loss {evals[-1][1]:.4f}")
            state = state._replace(step=step, adapter=adapter, opt_state=opt_state, examples_seen=seen,
                                   losses=tuple(losses), evals=tuple(evals))
            if checkpoint:
                save(state)
            if step == args.stop_after:
                break
    finally:
        bar.close()
    return state


def train(args: argparse.Namespace, job: Job, run_dir: RunDir) -> tuple[TrainState, Any]:
    """Fresh or resumed training up to ``--steps`` (or ``--stop-after``); returns the state and the placed base."""
    sampler = WindowSampler(job.train_ids, args.seq_len, args.seed)
    key = jax.random.key(args.seed)
    try:
        adapter = init_lora(job.frozen, job.lora_config, jax.random.fold_in(key, 0))
    except ValueError as err:  # no module matched --targets
        raise BadInput(f"--targets {args.targets}: {err}") from None
    tx, step_fn, eval_fn = compiled_programs(job.model, tuple((k, getattr(args, k)) for k in OPTIMIZER_FLAGS))
    fresh = TrainState(0, adapter, tx.init(adapter), key, 0, (), ())
    state = start_state(args, run_dir, fresh, job.settings,
                        lambda a: heldout_loss(eval_fn, a, job.frozen, job.eval_windows, args.batch_size))
    print(_describe("base model", state.evals[0][1]))
    frozen, state, place_batch = place_on_mesh(args, job.frozen, state)
    evaluate = lambda a: heldout_loss(eval_fn, a, frozen, job.eval_windows, args.batch_size)  # noqa: E731
    save = lambda s: run_dir.save(s, job.settings)  # noqa: E731
    return train_loop(args, step_fn, state, frozen, sampler, evaluate, save, place_batch), frozen


def place_on_mesh(args: argparse.Namespace, frozen, state: TrainState):
    """Shards the frozen params, adapter and optimizer state over ``--mesh``; returns a batch placer too."""
    if args.mesh is None:
        return frozen, state, lambda batch: batch
    from lora_jax.training.sharding import make_mesh, place_train_state, shard_batch

    try:
        mesh = make_mesh(args.mesh)
    except ValueError as err:
        raise BadInput(f"--mesh {args.mesh}: {err}") from None
    if args.batch_size % mesh.size:
        raise BadInput(f"--batch-size {args.batch_size} does not split over the {mesh.size} devices of --mesh "
                       f"{args.mesh}; pass a multiple of {mesh.size}.")
    frozen, adapter, opt_state = place_train_state(frozen, state.adapter, state.opt_state, mesh)
    return frozen, state._replace(adapter=adapter, opt_state=opt_state), lambda batch: shard_batch(batch, mesh)


def _describe(name: str, loss: float) -> str:
    return f"{name + ':':<11} held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}"


def greedy_continuations(job: Job, frozen, merged) -> dict[str, Any]:
    """The greedy continuation of the first held-out tokens by the base and by the merged model."""
    n_positions = job.model.config.n_positions
    prompt_len = min(PROMPT_TOKENS, n_positions // 2, len(job.heldout_ids) - 1)
    new = min(NEW_TOKENS, n_positions - prompt_len)
    prompt = jnp.asarray(job.heldout_ids[:prompt_len])[None]

    def continue_with(params) -> str:
        # A QLoRA base is dequantized once for sampling (generate runs the plain model).
        ids = generate(job.model, dequantize_params(params), prompt, max_new_tokens=new, temperature=0.0)
        return job.tokenizer.decode(np.asarray(ids)[0, prompt_len:].tolist())

    return {"prompt": job.tokenizer.decode(job.heldout_ids[:prompt_len].tolist()), "new_tokens": new,
            "base": continue_with(frozen), "adapted": continue_with(merged),
            "reference": job.tokenizer.decode(job.heldout_ids[prompt_len:prompt_len + new].tolist())}


def _visible(text: str) -> str:
    """One line of ``text``: a newline shown as ``\\n``, a run of them counted (greedy decoding loops on them).

    >>> _visible("a\\nb" + "\\n" * 5)
    'a\\\\n b [5 newlines]'
    """
    text = re.sub(r"\n{3,}", lambda run: f" [{len(run.group())} newlines] ", text)
    return " ".join(text.replace("\n", "\\n ").split())


def side_by_side(greedy: dict[str, Any], width: int = 38) -> str:
    """The two continuations in columns."""
    def column(text: str) -> list[str]:
        return textwrap.wrap(_visible(text), width) or [""]

    rows = [f"{'base model':<{width}} | with LoRA (merged)", f"{'-' * width}-+-{'-' * width}"]
    rows += [f"{a:<{width}} | {b}" for a, b in itertools.zip_longest(
        column(greedy["base"]), column(greedy["adapted"]), fillvalue="")]
    return "\n".join([f"greedy continuation (temperature 0) of the held-out prompt: {_visible(greedy['prompt'])}",
                      *rows, f"the text really continues: {_visible(greedy['reference'])}"])


def finish(args: argparse.Namespace, job: Job, state: TrainState, frozen: Any) -> dict[str, Any]:
    """Checks the merge, saves the adapter, shows base vs merged side by side, plots; returns the results."""
    base_loss, final_loss = state.evals[0][1], state.evals[-1][1]
    merged = merge(frozen, state.adapter)  # a QLoRA base is dequantized: the merged model is full precision
    _, _, eval_fn = compiled_programs(job.model, tuple((k, getattr(args, k)) for k in OPTIMIZER_FLAGS))
    no_delta = jax.tree.map(jnp.zeros_like, state.adapter)  # A = B = 0: exactly the merged weights alone
    merged_loss = heldout_loss(eval_fn, no_delta, merged, job.eval_windows, args.batch_size)
    if not abs(merged_loss - final_loss) <= MERGE_TOLERANCE[args.dtype]:
        raise CheckFailed(f"the merged model's held-out loss {merged_loss:.6f} differs from the adapter's "
                          f"{final_loss:.6f} by more than {MERGE_TOLERANCE[args.dtype]} ({args.dtype}).")
    save_adapter(args.out / "adapter", state.adapter, base_model_name_or_path=str(job.model_dir))
    greedy = greedy_continuations(job, frozen, merged)
    print(_describe("base model", base_loss))
    print(_describe("with LoRA", final_loss))
    print(side_by_side(greedy))
    method = "QLoRA (NF4 base)" if args.quantize else "LoRA"
    plot_losses(args.out / "loss.png", state.losses, state.evals, title=f"{method} r={args.rank} on {job.model_dir.name}")
    changed = [h for h in state.history if h.get("changed")]
    return {
        "model": str(job.model_dir) if args.model else f"embedded base ({job.model_dir.name})",
        "quantize": args.quantize,
        "data": str(args.data or "embedded target text"),
        "settings": {k: v for k, v in job.settings.items() if k != "model"},
        "params": trainable_summary(frozen, state.adapter),
        "train_tokens": int(len(job.train_ids)),
        "heldout_tokens_evaluated": int(job.eval_windows.shape[0] * (job.eval_windows.shape[1] - 1)),
        "base_heldout_loss": base_loss, "base_heldout_perplexity": math.exp(base_loss),
        "final_heldout_loss": final_loss, "final_heldout_perplexity": math.exp(final_loss),
        "merged_heldout_loss": merged_loss, "final_train_loss": state.losses[-1],
        "evals": [list(e) for e in state.evals], "greedy": greedy,
        "history": [dict(h) for h in state.history], "bit_identical_to_uninterrupted": not changed,
        "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
        "jax": jax.__version__, "optax": optax.__version__,
    }


def plot_losses(path: Path, losses: tuple[float, ...], evals: tuple[tuple[int, float], ...], title: str) -> None:
    """Training loss per step and held-out loss at each evaluation, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.6, label="train (per step)")
    eval_steps, eval_losses = zip(*evals)
    ax.plot(eval_steps, eval_losses, "o-", label="held-out")
    ax.axhline(evals[0][1], ls="--", c="gray", lw=0.8, label=f"base model held-out {evals[0][1]:.3f}")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda temp_name: fig.savefig(temp_name, dpi=110, format="png"))
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns the results written to ``results.json``."""
    started = time.perf_counter()
    with open_run_dir(args.out, resume=args.resume, overwrite=args.overwrite) as run_dir:  # before any work
        job = prepare(args)
        try:
            state, frozen = train(args, job, run_dir)
        except Diverged as err:  # name the newest good checkpoint of *this* run, verified, if there is one
            err.checkpoint = None if run_dir.replaces_old_run else latest_intact_checkpoint(run_dir.checkpoints).path
            raise
        if state.step < args.steps:
            print(f"stopped after step {state.step} (--stop-after); continue with --resume")
            return {"stopped_at": state.step}
        results = finish(args, job, state, frozen)
        results["wall_time_s"] = round(time.perf_counter() - started, 1)
        # allow_nan=False: a NaN can never reach results.json, whatever happened above.
        atomic_write_text(args.out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    return results


def _divergence_advice(args: argparse.Namespace, err: Diverged) -> str:
    lower = f"--lr {args.lr / 10:g}"
    last = err.checkpoint
    if last is None:
        return (f"error: divergence at {err}. Nothing was saved: this run had written no checkpoint yet. Start "
                f"again with a lower learning rate, e.g. {lower}.")
    return (f"error: divergence at {err}. Nothing from step {err.step} was saved; the newest good checkpoint is "
            f"{last}. Continue from it with a lower learning rate: --resume {lower} (or a lower --clip-norm).")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        run(args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointMismatchError as err:
        one_line = str(err).replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", ". ")
        print(f"error: {one_line} Rerun with the flags of that run to resume it, or start fresh with a new --out "
              "(or --overwrite).", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as err:
        print(_divergence_advice(args, err), file=sys.stderr)
        return EXIT_DIVERGED
    except CheckFailed as err:
        print(f"error: numerical check failed: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # the library's warnings, on stderr
    sys.exit(main())
