"""The offline default base model: a small GPT-2 this project trains itself, then caches.

No machine here can reach a model hub, yet the examples must run out of the box. So the
first call to ``ensure_base()`` trains a byte-level BPE tokenizer and a 4-layer GPT-2 on the
language reference every CPython ships (``corpus.base_corpus``), for about two minutes on two
CPU cores, and stores it as an ordinary HF GPT-2 directory: ``config.json``,
``model.safetensors``, ``tokenizer.json`` (+ ``tokenizer_config.json``) and
``embedded_base.json`` (corpus hashes, settings, losses). Both ``load_gpt2`` and
``transformers.GPT2LMHeadModel.from_pretrained`` open it. Later calls reuse the cache.
LoRA then adapts it to ``corpus.target_corpus()``, a text in a very different register.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lora_jax.embedded.pretraining import mean_token_loss, pretrain
from lora_jax.embedded.tokenizer import END_OF_TEXT, load_tokenizer, tokenizer_config, train_bpe_tokenizer
from lora_jax.embedded.corpus import base_corpus, target_corpus, target_path, text_sha256
from lora_jax.gpt2.loading import save_gpt2
from lora_jax.gpt2.model import GPT2, GPT2Config

__all__ = ["BaseSettings", "base_corpus", "build_base", "ensure_base", "load_tokenizer", "target_corpus"]

FORMAT_VERSION = 2  # 2: pre-trained with the library's one Batch convention and loss builder
CACHE_ENV = "LORA_PARITY_CACHE"
METADATA_FILE = "embedded_base.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", METADATA_FILE)
# The last 5% of the base corpus is never trained on; its loss measures generalisation.
BASE_HELDOUT_FRACTION = 0.05


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseSettings:
    """Everything that determines the embedded base. The defaults are the cached model."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    learning_rate: float = 3e-3
    seed: int = 0


def build_base(
    out_dir: str | os.PathLike,
    *,
    n_layer: int = BaseSettings.n_layer,
    n_embd: int = BaseSettings.n_embd,
    n_head: int = BaseSettings.n_head,
    vocab_size: int = BaseSettings.vocab_size,
    seq_len: int = BaseSettings.seq_len,
    batch_size: int = BaseSettings.batch_size,
    steps: int = BaseSettings.steps,
    seed: int = BaseSettings.seed,
    learning_rate: float = BaseSettings.learning_rate,
    progress: bool = True,
) -> Path:
    """Trains a tokenizer and a GPT-2 on the base corpus and writes them to ``out_dir``.

    ``out_dir`` must not exist or be empty. Everything is written to a temporary sibling
    directory that is renamed into place at the end, so an interrupted build leaves nothing.

    Returns:
        ``out_dir``, a HF GPT-2 directory with ``tokenizer.json`` and ``embedded_base.json``.

    Raises:
        ValueError: ``out_dir`` has files in it, or a setting is invalid.
    """
    settings = BaseSettings(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, seq_len=seq_len,
        batch_size=batch_size, steps=steps, learning_rate=learning_rate, seed=seed,
    )  # fmt: skip
    config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; pass a new path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        _build_into(staging, settings, config, progress)
        if out.exists():
            out.rmdir()  # empty, checked above; os.replace cannot replace a directory
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _build_into(model_dir: Path, settings: BaseSettings, config: GPT2Config, progress: bool) -> None:
    started = time.perf_counter()
    text = base_corpus()
    tokenizer = train_bpe_tokenizer(text, settings.vocab_size)
    ids = _encode(tokenizer, text)
    cut = int(len(ids) * (1.0 - BASE_HELDOUT_FRACTION))
    params, losses = pretrain(
        config, ids[:cut], batch_size=settings.batch_size, steps=settings.steps,
        learning_rate=settings.learning_rate, seed=settings.seed, progress=progress,
    )  # fmt: skip
    target_train, target_heldout = target_corpus()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    save_gpt2(params, config, model_dir, extra_config={"bos_token_id": eot, "eos_token_id": eot})
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(config.n_positions), indent=2))
    metadata = {
        "format_version": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "base_corpus": {"source": "pydoc_data.topics", "sha256": text_sha256(text), "tokens": int(len(ids))},
        "target_corpus": {"source": str(target_path()), "sha256": text_sha256(target_train + target_heldout)},
        "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 20) :])),  # last 5% of steps
        # Losses in nats per token of this tokenizer; the target text should score clearly worse.
        "base_heldout_loss": _loss_or_none(config, params, ids[cut:]),
        "target_train_loss": _loss_or_none(config, params, _encode(tokenizer, target_train)),
        "target_heldout_loss": _loss_or_none(config, params, _encode(tokenizer, target_heldout)),
    }
    metadata["build_seconds"] = round(time.perf_counter() - started, 1)  # tokenizer + training + evaluation
    (model_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)


def _loss_or_none(config: GPT2Config, params, ids: np.ndarray) -> float | None:
    if len(ids) < config.n_positions:
        return None  # too little text for one window (only with unusual settings)
    return mean_token_loss(GPT2(config), params, ids)


def default_cache_dir() -> Path:
    """``$LORA_PARITY_CACHE`` if set, else ``~/.cache/lora-parity``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-parity").expanduser()


def is_complete(model_dir: Path, settings: BaseSettings) -> bool:
    """True when every file is there and the metadata records exactly these settings."""
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        metadata = json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return metadata.get("format_version") == FORMAT_VERSION and metadata.get("settings") == dataclasses.asdict(
        settings
    )


def ensure_base(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The embedded base's directory, built on first use (about two minutes) and cached.

    Args:
        cache_dir: Where to keep it; default ``default_cache_dir()``.
        progress: Show the training progress bar when a build is needed.

    Returns:
        A directory that ``load_gpt2``, ``load_tokenizer`` and transformers can open.
    """
    settings = BaseSettings()
    model_dir = Path(cache_dir or default_cache_dir()) / f"embedded-gpt2-v{FORMAT_VERSION}"
    if is_complete(model_dir, settings):
        return model_dir
    if model_dir.exists():  # incomplete or from other settings: rebuild from scratch
        shutil.rmtree(model_dir)
    try:
        return build_base(model_dir, progress=progress, **dataclasses.asdict(settings))
    except (OSError, ValueError):
        # Another process may have finished the same build first and renamed it into place.
        if is_complete(model_dir, settings):
            return model_dir
        raise
