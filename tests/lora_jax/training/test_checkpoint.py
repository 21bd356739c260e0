"""Tests for lora_jax.training.checkpoint: exact round trips, atomic saves, validated restores."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.training import checkpoint as tc
from lora_jax.training.checkpoint import (CheckpointMismatchError, TrainState, latest_checkpoint,
                                       restore_checkpoint, save_checkpoint)

CONFIG = {"rank": 2, "targets": ["c_attn"], "lr": 1e-3}


def _lora(rank: int = 2, seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"transformer": {"h": {"0": {"attn": {"c_attn": {
        "lora_A": jax.random.normal(k1, (8, rank)), "lora_B": jax.random.normal(k2, (rank, 24))}}}}}}


def _state(step: int = 5, rank: int = 2, key=None) -> TrainState:
    lora = _lora(rank)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(lora)
    # One real update so mu, nu and count are non-trivial values, not zeros.
    grads = jax.tree.map(lambda x: 0.5 * x, lora)
    _, opt_state = tx.update(grads, opt_state, lora)
    return TrainState(step=step, lora=lora, opt_state=opt_state,
                      rng_key=jax.random.PRNGKey(11) if key is None else key,
                      examples_seen=4 * step, losses=tuple(0.1 * i + 1 / 3 for i in range(step)),
                      evals=((0, 3.25), (step, 1 / 7)))


def _assert_trees_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bit-exact: safetensors stores raw bytes


def test_round_trip_is_bit_exact_for_lora_optimizer_rng_and_position(tmp_path):
    state = _state()
    back = restore_checkpoint(save_checkpoint(tmp_path, state, CONFIG), _state(step=0), CONFIG)
    assert (back.step, back.examples_seen) == (5, 20)
    assert back.losses == state.losses  # python floats survive JSON exactly
    assert back.evals == ((0, 3.25), (5, 1 / 7))
    _assert_trees_identical(back.lora, state.lora)
    _assert_trees_identical(back.opt_state, state.opt_state)
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(state.opt_state)
    assert np.array_equal(back.rng_key, state.rng_key)


def test_typed_prng_keys_round_trip(tmp_path):
    state = _state(key=jax.random.key(3))
    back = restore_checkpoint(save_checkpoint(tmp_path, state, CONFIG), state, CONFIG)
    assert jnp.issubdtype(back.rng_key.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(back.rng_key), jax.random.key_data(state.rng_key))


def test_manifest_lists_every_tensor_with_shape_and_dtype(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    manifest = json.loads((path / tc.MANIFEST_FILE).read_text())
    tensors = manifest["tensors"]
    assert tensors["lora.transformer.h.0.attn.c_attn.lora_A"] == {"shape": [8, 2], "dtype": "float32"}
    assert tensors["rng_key"] == {"shape": [2], "dtype": "uint32"}
    # clip_by_global_norm has an empty state; adamw has (count, mu, nu) + the weight-decay/lr empties.
    assert sum(n.startswith("opt_state.") for n in tensors) == 5  # count + 2 mu + 2 nu
    assert manifest["step"] == 5 and manifest["run_config"] == CONFIG


def test_keeps_only_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step=step), CONFIG, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, _state(step=1), CONFIG)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tc, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, _state(step=2), CONFIG)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_half_written_temp_dir_from_a_killed_save_is_ignored(tmp_path):
    good = save_checkpoint(tmp_path, _state(step=1), CONFIG)
    stale = tmp_path / ".tmp-step_00000002-abc"
    stale.mkdir()
    (stale / tc.TENSORS_FILE).write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == good
    save_checkpoint(tmp_path, _state(step=2), CONFIG)
    assert not stale.exists()  # the next save cleans it up


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, _state(step=2), CONFIG)
    path = save_checkpoint(tmp_path, _state(step=2)._replace(examples_seen=99), CONFIG)
    assert restore_checkpoint(path, _state(), CONFIG).examples_seen == 99
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


def test_latest_checkpoint_of_missing_or_empty_root_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None


def test_config_mismatch_names_the_setting_and_the_fix(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"lr: checkpoint 0.001, this run 0.002(.|\n)*--out"):
        restore_checkpoint(path, _state(), dict(CONFIG, lr=2e-3))


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path, _state(rank=2), CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"c_attn.lora_A: checkpoint .*\[8, 2\].*\[8, 4\]"):
        restore_checkpoint(path, _state(rank=4), CONFIG)


def test_missing_tensor_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    template = _state()
    extra = {"transformer": dict(template.lora["transformer"], wte={"lora_A": jnp.zeros((3, 2))})}
    with pytest.raises(CheckpointMismatchError, match="missing tensor lora.transformer.wte.lora_A"):
        restore_checkpoint(path, template._replace(lora=extra), CONFIG)


def test_unknown_format_version_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    manifest = json.loads((path / tc.MANIFEST_FILE).read_text())
    (path / tc.MANIFEST_FILE).write_text(json.dumps(dict(manifest, version=99)))
    with pytest.raises(CheckpointMismatchError, match="version 99"):
        restore_checkpoint(path, _state(), CONFIG)


def test_keep_below_one_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, _state(), CONFIG, keep=0)


def test_damaged_manifest_raises_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    (path / tc.MANIFEST_FILE).write_text('{"format": "lora-parity-tr', encoding="utf-8")  # cut off mid-write
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON .*damaged.*new --out"):
        restore_checkpoint(path, _state(), CONFIG)
    (path / tc.MANIFEST_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        tc.read_manifest(path)


def test_tensor_file_that_disagrees_with_its_manifest_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = save_checkpoint(tmp_path, _state(), CONFIG)
    arrays = load_file(path / tc.TENSORS_FILE)
    arrays["rng_key"] = np.zeros(3, np.uint32)  # the manifest still says shape [2]
    save_file(arrays, path / tc.TENSORS_FILE)
    with pytest.raises(CheckpointMismatchError, match=r"rng_key: state\.safetensors holds shape \[3\], expected \[2\]"):
        restore_checkpoint(path, _state(), CONFIG)
