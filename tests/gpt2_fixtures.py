"""Small GPT-2 checkpoints for tests, written with ``save_pretrained``.

Every parameter, biases and LayerNorms included, is randomised so that a layout
mistake (a missing transpose, an untied head, a dropped bias) changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

# Two shapes: a square-ish one and one whose width is not a power of two with 3 heads.
TINY = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)
ALT = dict(n_layer=3, n_embd=48, n_head=3, vocab_size=97, n_positions=40)


def make_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """Returns a randomly initialised GPT-2 in eval mode with no dropout."""
    cfg = dict(TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def save_gpt2(path: Path, seed: int = 0, **overrides) -> Path:
    """Writes a checkpoint directory (config.json + model.safetensors) and returns it."""
    make_gpt2(seed, **overrides).save_pretrained(path)
    return Path(path)
