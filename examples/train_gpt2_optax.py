"""Fine-tune GPT-2 with LoRA and optax: resumable, NaN-guarded, offline by default.

With no arguments it trains LoRA on the project's embedded base (a small GPT-2 trained once
on text every CPython ships, then cached) using a different embedded target text, and prints
held-out loss and perplexity before and after, so the adaptation is visible::

    python examples/train_gpt2_optax.py                       # offline default, a few minutes on 2 CPU cores
    python examples/train_gpt2_optax.py --model gpt2 --data my.txt --steps 1000
    python examples/train_gpt2_optax.py --resume              # continue from the latest checkpoint in --out

Outputs under ``--out``: ``adapter/`` (PEFT format), ``loss.png``, ``results.json`` and
``checkpoints/step_*`` (see docs/training.md for the format and the resume guarantee).
Exit codes: 0 done, 2 bad settings or a checkpoint from another run, 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from lora_jax import (GPT2, LoraConfig, init_lora, load_gpt2, lora_apply, make_train_step, merge, save_adapter,
                      trainable_summary)
from lora_jax.atomic_files import atomic_write, atomic_write_text
from lora_jax.training.chunked_loss import chunked_cross_entropy
from lora_jax.embedded.base import ensure_base, load_tokenizer, target_corpus
from lora_jax.gpt2.generation import generate
from lora_jax.gpt2.loading import resolve_model_dir
from lora_jax.training.text_data import WindowSampler, heldout_windows, split_heldout
from lora_jax.training.checkpoint import TrainState, latest_checkpoint, restore_checkpoint, save_checkpoint

EXIT_BAD_SETTINGS, EXIT_NON_FINITE = 2, 3
MAX_EVAL_WINDOWS = 128  # bounds eval time on big --data files; the default held-out text is smaller
SAMPLE_PROMPT_TOKENS, SAMPLE_NEW_TOKENS = 12, 48
OPTIMIZER_FLAGS = ("lr", "steps", "warmup", "weight_decay", "clip_norm", "grad_accum")


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss or gradient."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see docs/training.md for every flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="'gpt2', a hub id or a checkpoint dir (default: embedded base)")
    p.add_argument("--data", type=Path, default=None, help="UTF-8 text file; its last 10%% is held out")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="c_attn,c_proj", help="comma-separated module names (PEFT rule)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA branch input")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps before the cosine decay")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/train_gpt2_optax"))
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=8' or 'data=4,fsdp=2'")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (params stay fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    # Testing hooks, documented in docs/training.md: simulate a crash, or a divergence.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--inject-nan-at", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = _check_args(args)
    if problems:
        p.error("; ".join(problems))
    return args


def _check_args(args: argparse.Namespace) -> list[str]:
    positive = ("rank", "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "ckpt_every")
    problems = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}" for n in positive
                if getattr(args, n) < 1]
    if not 0 <= args.warmup < args.steps:
        problems.append(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.lr <= 0 or args.clip_norm <= 0:
        problems.append("--lr and --clip-norm must be > 0")
    if args.data is not None and not args.data.is_file():
        problems.append(f"--data {args.data} is not a file")
    return problems


def load_texts(args: argparse.Namespace, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out token ids: the embedded target text, or ``--data`` split 90/10."""
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)

    if args.data is None:
        train_text, heldout_text = target_corpus()
        return encode(train_text), encode(heldout_text)
    return split_heldout(encode(args.data.read_text(encoding="utf-8")), 0.1)


def make_optimizer(*, lr: float, steps: int, warmup: int, weight_decay: float, clip_norm: float,
                   grad_accum: int) -> optax.GradientTransformation:
    """Clip, then AdamW on a warmup + cosine schedule; accumulated over ``grad_accum`` micro-batches."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps, end_value=0.1 * lr)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    # MultiSteps averages G micro-batch gradients, then applies tx once: the same update as one
    # batch G times larger, up to float rounding, since every micro-batch has the same token count.
    return optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()


def make_loss(model: GPT2, lora_config: LoraConfig):
    """``loss_fn(lora, frozen, (inputs, targets), rng, weights=None)``: next-token CE through the tied head."""
    forward = lora_apply(model.apply, lora_config)

    def loss_fn(lora, frozen, batch, rng, weights=None):
        inputs, targets = batch
        hidden = forward(frozen, lora, inputs, method=GPT2.hidden, dropout_rng=rng)  # (B, T, D)
        embedding = frozen["transformer"]["wte"]["embedding"]  # tied head, frozen: no grad needed
        return chunked_cross_entropy(hidden, embedding, targets, weights)

    return loss_fn


@functools.lru_cache(maxsize=4)
def compiled_programs(model: GPT2, lora_config: LoraConfig, optimizer: tuple[tuple[str, Any], ...]):
    """``(tx, step_fn, eval_fn)``, cached so repeated ``main()`` calls in one process (a notebook, a
    sweep, the tests) reuse the compiled programs instead of recompiling identical ones."""
    tx = make_optimizer(**dict(optimizer))
    loss_fn = make_loss(model, lora_config)
    eval_fn = jax.jit(lambda lora, frozen, inputs, targets, weights:
                      loss_fn(lora, frozen, (inputs, targets), None, weights))
    return tx, make_train_step(loss_fn, tx), eval_fn


def heldout_loss(eval_fn, lora, frozen, windows: tuple[np.ndarray, np.ndarray], batch_size: int) -> float:
    """Token-weighted mean loss over held-out windows; the last batch is zero-padded and masked out."""
    inputs, targets = windows
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        pad = batch_size - len(x)
        weights = np.pad(np.ones(y.shape, np.float32), ((0, pad), (0, 0)))
        x, y = (np.pad(a, ((0, pad), (0, 0))) for a in (x, y))  # one compiled shape for every batch
        total += float(eval_fn(lora, frozen, x, y, weights)) * float(weights.sum())
        count += float(weights.sum())
    return total / count


def run_config(args: argparse.Namespace, model_name: str, train_ids: np.ndarray) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint it continues."""
    keys = ("rank", "alpha", "targets", "dropout", "lr", "weight_decay", "clip_norm", "steps", "batch_size",
            "seq_len", "grad_accum", "warmup", "seed", "dtype")
    config = {k: getattr(args, k) for k in keys}
    config["model"] = model_name
    config["train_tokens_sha256"] = hashlib.sha256(train_ids.tobytes()).hexdigest()
    return config


def sample_text(model: GPT2, params, tokenizer, prompt: np.ndarray, key: jax.Array) -> str:
    """Prompt + sampled continuation (temperature 0.8, top-k 40), decoded."""
    new_tokens = min(SAMPLE_NEW_TOKENS, model.config.n_positions - len(prompt))
    ids = generate(model, params, jnp.asarray(prompt)[None], max_new_tokens=new_tokens,
                   temperature=0.8, top_k=40, key=key)
    return tokenizer.decode(np.asarray(ids)[0].tolist())


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic JSON write (temp file in the same directory, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _poison(lora):
    return jax.tree.map(lambda x: x * jnp.nan, lora)


def train_loop(args, step_fn, state: TrainState, frozen, sampler: WindowSampler, evaluate, save,
               place_batch) -> TrainState:
    """Runs optimizer steps ``state.step + 1 .. args.steps``; checkpoints, evaluates, guards against NaN."""
    dropout_key = jax.random.fold_in(state.rng_key, 1)
    lora, opt_state, seen = state.lora, state.opt_state, state.examples_seen
    losses, evals = list(state.losses), list(state.evals)
    bar = tqdm(total=args.steps, initial=state.step, desc="lora", disable=args.no_progress, dynamic_ncols=True)
    for step in range(state.step + 1, args.steps + 1):
        if step == args.inject_nan_at:
            lora = _poison(lora)
        micro_losses = []
        for micro in range(args.grad_accum):
            batch = place_batch(sampler.batch(seen, args.batch_size))
            rng = jax.random.fold_in(jax.random.fold_in(dropout_key, step), micro)
            lora, opt_state, metrics = step_fn(lora, opt_state, frozen, batch, rng)
            seen += args.batch_size
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                raise NonFiniteLossError(f"step {step}: loss {loss}, gradient norm {grad_norm}")
            micro_losses.append(loss)
        losses.append(sum(micro_losses) / len(micro_losses))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, evaluate(lora)))
            bar.write(f"step {step}: held-out loss {evals[-1][1]:.4f}")
        state = TrainState(step, lora, opt_state, state.rng_key, seen, tuple(losses), tuple(evals))
        if step % args.ckpt_every == 0 or step == args.steps:
            save(state)
        if step == args.stop_after:
            break
    bar.close()
    return state


def _describe(name: str, loss: float) -> str:
    return f"{name}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}"


class Job(NamedTuple):
    """What the run trains on: the base model, its tokenizer, the texts, the LoRA config and the settings
    a resumed run must share (``run_config``, hashed once)."""

    model_dir: Path
    model: GPT2
    frozen: Any
    tokenizer: Any
    train_ids: np.ndarray
    heldout_ids: np.ndarray
    eval_windows: tuple[np.ndarray, np.ndarray]
    lora_config: LoraConfig
    settings: dict[str, Any]


def prepare(args: argparse.Namespace) -> Job:
    """Loads the base and tokenizer, tokenises the texts, builds the LoRA config; validates sizes first."""
    model_dir = ensure_base(progress=not args.no_progress) if args.model is None else resolve_model_dir(args.model)
    config, frozen = load_gpt2(model_dir)
    if args.seq_len > config.n_positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {config.n_positions} positions; lower it.")
    tokenizer = load_tokenizer(model_dir)
    train_ids, heldout_ids = load_texts(args, tokenizer)
    windows = tuple(a[:MAX_EVAL_WINDOWS] for a in heldout_windows(heldout_ids, args.seq_len))
    lora_config = LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                             target_modules=[t.strip() for t in args.targets.split(",") if t.strip()])
    model = GPT2(config, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    settings = run_config(args, str(Path(model_dir).resolve()), train_ids)
    return Job(Path(model_dir), model, frozen, tokenizer, train_ids, heldout_ids, windows, lora_config, settings)


def train(args: argparse.Namespace, job: Job) -> tuple[TrainState, Any]:
    """Fresh or resumed training up to ``--steps`` (or ``--stop-after``); returns the state and the placed base."""
    sampler = WindowSampler(job.train_ids, args.seq_len, args.seed)
    key = jax.random.key(args.seed)
    lora = init_lora(job.frozen, job.lora_config, jax.random.fold_in(key, 0))
    optimizer = tuple((k, getattr(args, k)) for k in OPTIMIZER_FLAGS)
    tx, step_fn, eval_fn = compiled_programs(job.model, job.lora_config, optimizer)
    ckpt_root = args.out / "checkpoints"
    fresh = TrainState(0, lora, tx.init(lora), key, 0, (), ())
    state = _start_state(args, ckpt_root, fresh, job.settings,
                         lambda lo: heldout_loss(eval_fn, lo, job.frozen, job.eval_windows, args.batch_size))
    print(_describe("base model", state.evals[0][1]))
    frozen, state, place_batch = place_on_mesh(args.mesh, job.frozen, state)
    evaluate = lambda lo: heldout_loss(eval_fn, lo, frozen, job.eval_windows, args.batch_size)  # noqa: E731
    save = lambda s: save_checkpoint(ckpt_root, s, job.settings)  # noqa: E731
    return train_loop(args, step_fn, state, frozen, sampler, evaluate, save, place_batch), frozen


def finish(args: argparse.Namespace, job: Job, state: TrainState, frozen: Any) -> dict[str, Any]:
    """Saves the adapter, samples before/after (after = merged weights), plots; returns the results."""
    base_loss, final_loss = state.evals[0][1], state.evals[-1][1]
    print(_describe("base model", base_loss))
    print(_describe("with LoRA ", final_loss))
    save_adapter(args.out / "adapter", state.lora, job.lora_config, base_model_name_or_path=str(job.model_dir))
    merged = merge(frozen, state.lora, job.lora_config)
    prompt, key = job.heldout_ids[:SAMPLE_PROMPT_TOKENS], jax.random.fold_in(state.rng_key, 2)
    samples = {"before": sample_text(job.model, frozen, job.tokenizer, prompt, key),
               "after": sample_text(job.model, merged, job.tokenizer, prompt, key)}
    for when, text in samples.items():
        print(f"--- sample {when} ---\n{text}")
    plot_losses(args.out / "loss.png", state.losses, state.evals, title=f"LoRA r={args.rank} on {job.model_dir.name}")
    return {
        "model": str(job.model_dir) if args.model else f"embedded base ({job.model_dir.name})",
        "data": str(args.data or "embedded target text"),
        "settings": {k: v for k, v in job.settings.items() if k != "model"},
        "params": trainable_summary(frozen, state.lora),
        "train_tokens": int(len(job.train_ids)), "heldout_tokens_evaluated": int(job.eval_windows[0].size),
        "base_heldout_loss": base_loss, "base_heldout_perplexity": math.exp(base_loss),
        "final_heldout_loss": final_loss, "final_heldout_perplexity": math.exp(final_loss),
        "final_train_loss": state.losses[-1], "evals": [list(e) for e in state.evals], "samples": samples,
        "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
        "jax": jax.__version__, "optax": optax.__version__,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns the results written to ``results.json``."""
    started = time.perf_counter()
    job = prepare(args)
    state, frozen = train(args, job)
    if state.step < args.steps:
        print(f"stopped after step {state.step} (--stop-after); resume with --resume")
        return {"stopped_at": state.step}
    results = finish(args, job, state, frozen)
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "results.json", results)
    return results


def _start_state(args, ckpt_root: Path, fresh: TrainState, settings: dict, evaluate) -> TrainState:
    """The latest checkpoint with ``--resume``, else a fresh state whose step-0 eval is the base model's."""
    latest = latest_checkpoint(ckpt_root)
    if args.resume and latest is not None:
        state = restore_checkpoint(latest, fresh, settings)
        print(f"resumed from {latest} (step {state.step})")
        return state
    if args.resume:
        print(f"no checkpoint under {ckpt_root}; starting fresh")
    elif latest is not None:
        print(f"starting fresh: removing the old checkpoints in {ckpt_root} (pass --resume to continue them)")
        shutil.rmtree(ckpt_root)
    return fresh._replace(evals=((0, evaluate(fresh.lora)),))  # B = 0: exactly the base model


def place_on_mesh(spec: str | None, frozen, state: TrainState):
    """Shards the frozen params, LoRA and optimizer state over ``--mesh``; returns a batch placer too."""
    if spec is None:
        return frozen, state, lambda batch: batch
    from lora_jax.training.sharding import make_mesh, place_train_state, shard_batch

    mesh = make_mesh(spec)
    frozen, lora, opt_state = place_train_state(frozen, state.lora, state.opt_state, mesh)
    return frozen, state._replace(lora=lora, opt_state=opt_state), lambda batch: shard_batch(batch, mesh)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:  # CheckpointMismatchError included: settings the user must change
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except NonFiniteLossError as err:
        last = latest_checkpoint(args.out / "checkpoints")
        print(f"error: non-finite training loss at {err}. Stopped without saving this step; the last good "
              f"checkpoint is {last}. Lower --lr or --clip-norm, then continue with --resume.", file=sys.stderr)
        return EXIT_NON_FINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
