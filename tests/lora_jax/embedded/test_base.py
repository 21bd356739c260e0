"""The embedded offline base: corpora, tokenizer, a tiny real build, and the cache rules."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from lora_jax.embedded import base as embedded
from lora_jax.embedded.tokenizer import END_OF_TEXT, load_tokenizer, train_bpe_tokenizer
from lora_jax.embedded.corpus import base_corpus, target_corpus, target_path, text_sha256
from lora_jax.embedded.base import BaseSettings, build_base, ensure_base
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.gpt2.model import GPT2

TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=300, seq_len=32, batch_size=4, steps=12, seed=0)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("base") / "tiny", progress=False, **TINY)


def test_tiny_build_loads_in_flax_and_transformers_with_equal_logits(tiny_base):
    config, params = load_gpt2(tiny_base)
    assert (config.n_layer, config.n_embd, config.vocab_size, config.n_positions) == (2, 32, 300, 32)
    ids = np.asarray([load_tokenizer(tiny_base).encode("The with statement is used to wrap a block").ids])
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(GPT2(config).apply)({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(tiny_base).eval()(torch.as_tensor(ids)).logits.numpy()
    # Same fp32 weights in both frameworks; 1e-5 covers summation order (see test_gpt2_loading).
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_tiny_build_records_its_corpus_settings_and_a_loss_below_uniform(tiny_base):
    meta = json.loads((tiny_base / "embedded_base.json").read_text())
    assert meta["settings"] == dataclasses.asdict(BaseSettings(**TINY))
    assert meta["base_corpus"]["sha256"] == text_sha256(base_corpus())
    assert meta["target_corpus"]["sha256"] == text_sha256("".join(target_corpus()))
    assert meta["final_train_loss"] < math.log(300)  # a uniform guess over 300 tokens scores log 300
    for key in ("base_heldout_loss", "target_train_loss", "target_heldout_loss"):
        assert 0.0 < meta[key] < 2 * math.log(300)
    assert json.loads((tiny_base / "config.json").read_text())["eos_token_id"] == 0


def test_tokenizer_round_trips_and_transformers_can_open_it(tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    train, heldout = target_corpus()
    for text in (base_corpus()[:2000], heldout[:2000], "naïve café – 3 × 4 ≠ 5\n\ttabs"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.token_to_id(END_OF_TEXT) == 0 and tokenizer.get_vocab_size() == 300
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert hf_tokenizer("A license text.")["input_ids"] == tokenizer.encode("A license text.").ids


def test_vocab_and_merges_directory_loads_the_same_tokenizer(tiny_base, tmp_path):
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.model.save(str(tmp_path))  # writes GPT-2's original vocab.json + merges.txt
    reloaded = load_tokenizer(tmp_path)
    text = base_corpus()[5000:7000]
    assert reloaded.encode(text).ids == tokenizer.encode(text).ids


def test_corpora_are_real_and_distinct():
    base = base_corpus()
    train, heldout = target_corpus()
    assert len(base) > 300_000 and 'The "for" statement' in base
    assert train.endswith("\n") and len(heldout) / (len(train) + len(heldout)) == pytest.approx(0.15, abs=0.02)
    assert train[:500] not in base


def test_target_path_missing_everywhere_raises(monkeypatch, tmp_path):
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="LICENSE.txt"):
        target_path()


def test_small_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_bpe_tokenizer("abc", vocab_size=100)


def test_directory_without_tokenizer_files_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        build_base(tmp_path, progress=False, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_base(tmp_path / "base", progress=False, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_ensure_base_reuses_a_complete_cache_and_rebuilds_an_incomplete_one(tiny_base, tmp_path, monkeypatch):
    # Make the tiny settings the defaults so the cache check and any rebuild stay fast.
    monkeypatch.setattr(embedded, "BaseSettings", functools.partial(BaseSettings, **TINY))
    cached = tmp_path / f"embedded-gpt2-v{embedded.FORMAT_VERSION}"
    shutil.copytree(tiny_base, cached)
    marker = cached / "model.safetensors"
    marker_mtime = marker.stat().st_mtime_ns
    assert ensure_base(tmp_path, progress=False) == cached
    assert marker.stat().st_mtime_ns == marker_mtime  # reused, not rebuilt

    (cached / "tokenizer.json").unlink()  # an incomplete cache is rebuilt from scratch
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    assert ensure_base(progress=False) == cached
    assert (cached / "tokenizer.json").is_file()
    _, rebuilt = load_gpt2(cached)
    _, original = load_gpt2(tiny_base)
    # Same seed and settings: the rebuild reproduces the weights to float rounding.
    np.testing.assert_allclose(rebuilt["transformer"]["wte"]["embedding"], original["transformer"]["wte"]["embedding"], atol=1e-6)
