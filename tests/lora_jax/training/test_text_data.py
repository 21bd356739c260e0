"""Tests for lora_jax.training.text_data: exact windows, epoch coverage, resumable positions."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_window_count_uses_stride_seq_len_and_one_extra_target_token():
    assert [window_count(n, 4) for n in (0, 4, 5, 8, 9, 13)] == [0, 0, 1, 1, 2, 3]


def test_heldout_windows_are_in_text_order_and_shifted_by_one():
    x, y = heldout_windows(np.arange(10), 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_heldout_windows_too_short_names_the_flag_to_change():
    with pytest.raises(ValueError, match="--seq-len"):
        heldout_windows(np.arange(4), 4)


def test_one_epoch_visits_every_window_exactly_once():
    sampler = WindowSampler(np.arange(41), seq_len=4, seed=3)
    assert sampler.num_windows == 10
    x, y = sampler.batch(examples_seen=0, batch_size=10)
    assert sorted(x[:, 0].tolist()) == list(range(0, 40, 4))
    np.testing.assert_array_equal(y, x + 1)  # arange ids: each target is its input plus one


def test_batches_are_a_pure_function_of_examples_seen_across_epochs():
    sampler = WindowSampler(np.arange(17), seq_len=4, seed=0)  # 4 windows per epoch
    whole_x, whole_y = sampler.batch(examples_seen=2, batch_size=6)  # straddles epochs 0 and 1
    parts = [sampler.batch(examples_seen=s, batch_size=b) for s, b in ((2, 2), (4, 3), (7, 1))]
    np.testing.assert_array_equal(whole_x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(whole_y, np.concatenate([p[1] for p in parts]))


def test_same_seed_same_order_and_epochs_reshuffle():
    a = WindowSampler(np.arange(201), seq_len=4, seed=7)
    b = WindowSampler(np.arange(201), seq_len=4, seed=7)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), WindowSampler(np.arange(201), 4, seed=8).epoch_order(0))
    assert sorted(a.epoch_order(1).tolist()) == list(range(50))


def test_sampler_rejects_bad_inputs_with_clear_errors():
    with pytest.raises(ValueError, match="1-D"):
        WindowSampler(np.zeros((2, 8), np.int32), seq_len=2, seed=0)
    with pytest.raises(TypeError, match="integer token ids"):
        WindowSampler(np.zeros(8, np.float32), seq_len=2, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(np.arange(8), seq_len=0, seed=0)
    with pytest.raises(ValueError, match="smaller --seq-len"):
        WindowSampler(np.arange(8), seq_len=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        WindowSampler(np.arange(8), seq_len=2, seed=0).batch(0, 0)
