"""Fine-tune GPT-2 with LoRA in PyTorch: the tutorial's flow, with its mistakes fixed, offline by default.

load GPT-2 -> inject LoRA into c_attn and c_proj -> freeze the base -> AdamW (lr 5e-4, wd 0.01,
grad-norm clip 1.0) with a tqdm loss bar -> save the adapter (PEFT directory + the tutorial's flat
file) -> sample (temperature 0.7, top-k 50) -> merge, and check the merged model's greedy tokens
equal the LoRA model's::

    python examples/train_gpt2_torch.py                        # embedded base + embedded target text, offline
    python examples/train_gpt2_torch.py --model gpt2 --data my.txt --steps 500
    python examples/train_gpt2_torch.py --model path/to/hf_checkpoint_dir
    python examples/train_gpt2_torch.py --quantize nf4         # QLoRA: a frozen NF4 base (bitsandbytes)

With ``--quantize nf4`` the base's linear layers become bitsandbytes ``Linear4bit`` (NF4, double
quantization, float32 compute; ``lora_torch.quantize_base``) before LoRA is injected, and the final
merge dequantizes them: the merged model is full precision.

Outputs under ``--out``: ``adapter/`` (PEFT format: ``peft.PeftModel.from_pretrained`` loads it),
``lora_weights.safetensors`` and ``results.json``.
Exit codes: 0 done, 2 bad settings, 3 the merged model's greedy tokens differ from the LoRA model's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import GPT2LMHeadModel

from lora_torch import (
    BitsandbytesMissingError,
    freeze_base_model,
    inject_lora,
    merge_lora_weights,
    print_trainable_parameters,
    quantize_base,
    save_adapter,
    save_lora_weights,
)
from lora_torch.tensor_files import atomic_destination

EXIT_BAD_SETTINGS, EXIT_MERGE_MISMATCH = 2, 3
MAX_EVAL_WINDOWS = 32  # bounds evaluation time on a big --data file
PROMPT_TOKENS = 12
MERGE_CHECK_LINE = "merged greedy tokens match the LoRA model: {}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id such as 'gpt2' (default: embedded base)")
    p.add_argument("--data", type=Path, default=None, help="UTF-8 text file; its last 10%% is held out "
                   "(default: the embedded target text)")
    p.add_argument("--targets", default="c_attn,c_proj", help="comma-separated module names (PEFT's suffix rule)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA branch input")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sample-tokens", type=int, default=40, help="new tokens per generated sample")
    p.add_argument("--out", type=Path, default=Path("runs/train_gpt2_torch"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="QLoRA: quantize the base to 4-bit NF4 with bitsandbytes before injecting LoRA")
    args = p.parse_args(argv)
    positive = ("rank", "steps", "batch_size", "seq_len", "sample_tokens")
    problems = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}" for n in positive
                if getattr(args, n) < 1]
    if args.lr <= 0 or args.clip_norm <= 0 or args.alpha <= 0:
        problems.append("--lr, --clip-norm and --alpha must be > 0")
    if not 0 <= args.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.data is not None and not args.data.is_file():
        problems.append(f"--data {args.data} is not a file")
    if problems:
        p.error("; ".join(problems))  # exits with EXIT_BAD_SETTINGS
    return args


def resolve_model(model: str | None) -> str:
    """A checkpoint dir or hub id; the default is the project's embedded base, trained once and cached."""
    if model is not None:
        return model
    from lora_jax.embedded.base import ensure_base  # only the offline default needs the JAX side

    return str(ensure_base())


def load_tokenizer(model: str) -> Tokenizer:
    """The BPE tokenizer of a checkpoint dir (its tokenizer.json) or of a hub id."""
    path = Path(model)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; save one there with "
                                    "tokenizer.save(str(path / 'tokenizer.json')).")
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    return Tokenizer.from_pretrained(model)


def load_token_ids(data: Path | None, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token ids: the embedded target text, or ``--data`` split 90/10."""
    if data is not None:
        # Split the tokens, not the characters, as the optax example does.
        ids = tokenizer.encode(data.read_text(encoding="utf-8")).ids
        cut = int(0.9 * len(ids))
        return torch.tensor(ids[:cut], dtype=torch.long), torch.tensor(ids[cut:], dtype=torch.long)
    from lora_jax.embedded.base import target_corpus

    train_text, heldout_text = target_corpus()
    return (torch.tensor(tokenizer.encode(train_text).ids, dtype=torch.long),
            torch.tensor(tokenizer.encode(heldout_text).ids, dtype=torch.long))


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len) batch of windows at random offsets; the model shifts labels itself."""
    starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model: GPT2LMHeadModel, ids: torch.Tensor, seq_len: int, device: str, batch_size: int) -> float:
    """Mean next-token loss over consecutive held-out windows (at most MAX_EVAL_WINDOWS).

    Windows go through the model ``batch_size`` at a time, so evaluation never holds more logits
    than a training step. Every window scores ``seq_len - 1`` tokens, so weighting each batch's
    mean by its window count gives the exact overall mean.
    """
    model.eval()
    count = min(MAX_EVAL_WINDOWS, len(ids) // seq_len)
    windows = ids[: count * seq_len].view(count, seq_len)  # (N, T)
    total = 0.0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        total += model(batch, labels=batch).loss.item() * len(batch)
    return total / count


def train(model: GPT2LMHeadModel, ids: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """AdamW on the trainable (LoRA) parameters only, with grad-norm clipping; returns the losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    model.train()  # LoRA dropout on; the base model's own dropout follows its config
    bar = tqdm(range(args.steps), desc="train", disable=args.no_progress)
    for _ in bar:
        batch = random_windows(ids, args.batch_size, args.seq_len, generator).to(args.device)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.clip_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def generate(model: GPT2LMHeadModel, prompt: torch.Tensor, new_tokens: int, *, sample: bool) -> list[int]:
    """Continues a (1, T) prompt: sampled at temperature 0.7 / top-k 50, or greedy."""
    model.eval()
    options = {"do_sample": True, "temperature": 0.7, "top_k": 50} if sample else {"do_sample": False}
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id, **options)
    return out[0, prompt.shape[1]:].tolist()


def check_sizes(model: GPT2LMHeadModel, train_ids: torch.Tensor, heldout_ids: torch.Tensor,
                args: argparse.Namespace) -> list[str]:
    """Problems with --seq-len against the model and the data, as messages."""
    problems = []
    if args.seq_len > model.config.n_positions:
        problems.append(f"--seq-len {args.seq_len} exceeds the model's n_positions {model.config.n_positions}")
    if len(train_ids) <= args.seq_len or len(heldout_ids) < max(args.seq_len, PROMPT_TOKENS):
        problems.append(f"the text is too short for --seq-len {args.seq_len} ({len(train_ids)} train and "
                        f"{len(heldout_ids)} held-out tokens)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Runs the whole flow; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # show what lora_torch reports (the injected modules)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # the merge check compares fp32 greedy tokens
    model_name = resolve_model(args.model)
    tokenizer = load_tokenizer(model_name)
    model = GPT2LMHeadModel.from_pretrained(model_name).to(args.device)
    train_ids, heldout_ids = load_token_ids(args.data, tokenizer)
    problems = check_sizes(model, train_ids, heldout_ids, args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return EXIT_BAD_SETTINGS

    if args.quantize == "nf4":
        try:
            quantize_base(model)
        except BitsandbytesMissingError as error:
            print(f"error: --quantize nf4: {error}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
    inject_lora(model, [t.strip() for t in args.targets.split(",") if t.strip()], args.rank, args.alpha,
                dropout=args.dropout)
    freeze_base_model(model)
    counts = print_trainable_parameters(model)
    loss_before = heldout_loss(model, heldout_ids, args.seq_len, args.device, args.batch_size)
    losses = train(model, train_ids, args)
    loss_after = heldout_loss(model, heldout_ids, args.seq_len, args.device, args.batch_size)
    print(f"held-out loss {loss_before:.4f} -> {loss_after:.4f} "
          f"(perplexity {math.exp(loss_before):.2f} -> {math.exp(loss_after):.2f})")

    args.out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, args.out / "adapter", base_model_name_or_path=model_name)
    save_lora_weights(model, args.out / "lora_weights.safetensors")

    prompt = heldout_ids[:PROMPT_TOKENS].unsqueeze(0).to(args.device)  # (1, T)
    sample = generate(model, prompt, args.sample_tokens, sample=True)
    print(f"sample: {tokenizer.decode(prompt[0].tolist())!r} -> {tokenizer.decode(sample)!r}")
    lora_greedy = generate(model, prompt, args.sample_tokens, sample=False)
    merge_lora_weights(model)  # with --quantize nf4 this dequantizes: W = dequantize(W_nf4) + s B A
    merged_greedy = generate(model, prompt, args.sample_tokens, sample=False)
    match = merged_greedy == lora_greedy
    print(MERGE_CHECK_LINE.format(match))

    results = {"model": model_name, "quantize": args.quantize, "trainable": counts["trainable"],
               "total": counts["total"],
               "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
               "train_loss_first": losses[0], "train_loss_last": losses[-1], "merged_greedy_match": match}
    with atomic_destination(args.out / "results.json") as tmp:  # a crash leaves no half-written file
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if match else EXIT_MERGE_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
