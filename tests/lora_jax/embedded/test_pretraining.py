"""mean_token_loss: consecutive windows sharing one boundary token, equal-shape batches, clear errors."""

import jax
import numpy as np
import optax
import pytest

from lora_jax.embedded.pretraining import mean_token_loss
from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params

CONFIG = GPT2Config(vocab_size=11, n_positions=4, n_embd=8, n_layer=1, n_head=2)


def window_loss(model, params, window):
    logits = model.apply({"params": params}, window[None, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, window[None, 1:]).mean())


def test_mean_over_windows_that_share_their_boundary_token():
    model, params = GPT2(CONFIG), init_gpt2_params(CONFIG, jax.random.key(0))
    # Windows of n_positions = 4 tokens at stride 3: [0:4] and [3:7]; the tail 7 is dropped.
    ids = np.arange(8, dtype=np.int32) % CONFIG.vocab_size
    expected = np.mean([window_loss(model, params, ids[0:4]), window_loss(model, params, ids[3:7])])
    # Same float32 forward per window, batched vs one at a time: a few ulps of a loss near log(11).
    assert mean_token_loss(model, params, ids, batch_size=2) == pytest.approx(expected, abs=1e-5)
    # batch_size=1 visits the same two windows in two batches.
    assert mean_token_loss(model, params, ids, batch_size=1) == pytest.approx(expected, abs=1e-5)


def test_too_short_a_stream_names_the_window_size():
    model, params = GPT2(CONFIG), init_gpt2_params(CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"at least n_positions = 4 tokens .* got 3"):
        mean_token_loss(model, params, np.arange(3, dtype=np.int32))
    assert mean_token_loss(model, params, np.arange(4, dtype=np.int32)) > 0.0  # exactly one window suffices
