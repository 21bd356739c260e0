"""Tests for lora_jax.training.text_data: exact windows, epoch coverage, resumable positions."""

from __future__ import annotations

import numpy as np
import pytest

from lora_jax import Batch
from lora_jax.training.text_data import WindowSampler, heldout_windows, split_heldout, window_count


def test_split_heldout_keeps_a_contiguous_tail():
    train, heldout = split_heldout(np.arange(100), 0.1)
    assert train.tolist() == list(range(90))
    assert heldout.tolist() == list(range(90, 100))
    assert train.dtype == np.int32


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_split_heldout_rejects_fraction_outside_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_heldout(np.arange(10), fraction)


def test_window_count_uses_stride_seq_len_minus_one():
    assert [window_count(n, 4) for n in (0, 3, 4, 6, 7, 10)] == [0, 0, 1, 1, 2, 3]


def test_heldout_windows_are_in_text_order_and_share_one_boundary_token():
    windows = heldout_windows(np.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows.dtype == np.int32


def test_too_short_text_says_what_is_wrong_without_naming_a_command_line_flag():
    with pytest.raises(ValueError, match=r"Held-out text has 3 tokens, fewer than seq_len = 4; use a shorter") as info:
        heldout_windows(np.arange(3), 4)
    assert "--" not in str(info.value)  # the example adds its flag (--seq-len); the library does not know it
    with pytest.raises(ValueError, match=r"Training text has 7 tokens, fewer than seq_len = 8") as info:
        WindowSampler(np.arange(7), seq_len=8, seed=0)
    assert "--" not in str(info.value)


def test_one_epoch_visits_every_window_exactly_once():
    sampler = WindowSampler(np.arange(31), seq_len=4, seed=3)
    assert sampler.num_windows == 10
    batch = sampler.batch(examples_seen=0, batch_size=10)
    assert isinstance(batch, Batch) and batch.mask is None
    assert sorted(batch.input_ids[:, 0].tolist()) == list(range(0, 30, 3))
    np.testing.assert_array_equal(batch.input_ids, batch.input_ids[:, :1] + np.arange(4))  # arange ids: consecutive


def test_batches_are_a_pure_function_of_examples_seen_across_epochs():
    sampler = WindowSampler(np.arange(13), seq_len=4, seed=0)  # 4 windows per epoch
    whole = sampler.batch(examples_seen=2, batch_size=6)  # straddles epochs 0 and 1
    parts = [sampler.batch(examples_seen=s, batch_size=b) for s, b in ((2, 2), (4, 3), (7, 1))]
    np.testing.assert_array_equal(whole.input_ids, np.concatenate([p.input_ids for p in parts]))


def test_same_seed_same_order_and_epochs_reshuffle():
    a = WindowSampler(np.arange(151), seq_len=4, seed=7)
    b = WindowSampler(np.arange(151), seq_len=4, seed=7)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), WindowSampler(np.arange(151), 4, seed=8).epoch_order(0))
    assert sorted(a.epoch_order(1).tolist()) == list(range(50))


def test_sampler_rejects_bad_inputs_with_clear_errors():
    with pytest.raises(ValueError, match="1-D"):
        WindowSampler(np.zeros((2, 8), np.int32), seq_len=2, seed=0)
    with pytest.raises(TypeError, match="integer token ids"):
        WindowSampler(np.zeros(8, np.float32), seq_len=2, seed=0)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        WindowSampler(np.arange(8), seq_len=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        WindowSampler(np.arange(8), seq_len=2, seed=0).batch(0, 0)
