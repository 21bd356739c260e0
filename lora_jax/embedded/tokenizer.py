"""Byte-level BPE tokenizers (GPT-2's scheme) through the ``tokenizers`` library.

``train_bpe_tokenizer`` learns a small vocabulary for the embedded base; ``load_tokenizer``
opens the tokenizer of any GPT-2 directory (``tokenizer.json``, or GPT-2's original
``vocab.json`` + ``merges.txt``) or of a hub id when online.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
_BYTE_ALPHABET = 256


def _byte_level(bpe: models.BPE) -> Tokenizer:
    tokenizer = Tokenizer(bpe)
    # GPT-2's convention: no prefix space, whitespace kept inside tokens as the byte-level 'Ġ'.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Learns a byte-level BPE with ``vocab_size`` entries; ``<|endoftext|>`` gets id 0.

    Every byte is in the vocabulary, so any text encodes and decodes back exactly.

    Example:
        >>> tok = train_bpe_tokenizer("the cat sat on the mat. " * 20, vocab_size=270)
        >>> tok.decode(tok.encode("the cat, the hat!").ids)
        'the cat, the hat!'
    """
    if not isinstance(vocab_size, int) or vocab_size < _BYTE_ALPHABET + 1:
        raise ValueError(
            f"vocab_size must be an int >= {_BYTE_ALPHABET + 1} (256 bytes + {END_OF_TEXT}), got {vocab_size!r}."
        )
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def tokenizer_config(max_length: int) -> dict:
    """``tokenizer_config.json`` content so ``transformers.AutoTokenizer`` can open the directory too."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": max_length,
    }


def load_tokenizer(model_dir_or_hub_id: str | os.PathLike) -> Tokenizer:
    """The tokenizer that belongs to a GPT-2 checkpoint.

    Args:
        model_dir_or_hub_id: A directory holding ``tokenizer.json`` or ``vocab.json`` +
            ``merges.txt``; or a hub id such as ``"gpt2"`` (needs network).

    Raises:
        FileNotFoundError: A directory without tokenizer files.
        OSError: A hub id that cannot be fetched.
    """
    path = Path(model_dir_or_hub_id).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _from_vocab_and_merges(path / "vocab.json", path / "merges.txt")
        raise FileNotFoundError(f"No tokenizer.json (or vocab.json + merges.txt) in {path}.")
    try:
        return Tokenizer.from_pretrained(str(model_dir_or_hub_id))
    except Exception as err:  # the hub client raises several types for offline / unknown ids
        raise OSError(
            f"Could not fetch the tokenizer of {model_dir_or_hub_id!r} ({type(err).__name__}: {err}). "
            "Offline? Pass a local model directory."
        ) from err


def _from_vocab_and_merges(vocab: Path, merges: Path) -> Tokenizer:
    tokenizer = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    if END_OF_TEXT in json.loads(vocab.read_text(encoding="utf-8")):
        tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer
