"""Tests for lora_jax.training.checkpoint: exact round trips, atomic saves, digests, validated restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import Adapter, LoraConfig
from lora_jax.training import checkpoint as tc
from lora_jax.training.checkpoint import (CheckpointDamagedError, CheckpointMismatchError, NonFiniteStateError,
                                          TrainState, latest_checkpoint, latest_intact_checkpoint, restore_checkpoint,
                                          save_checkpoint, verify_checkpoint)

CONFIG = {"rank": 2, "targets": ["c_attn"], "lr": 1e-3, "clip_norm": 1.0}
A_NAME = "adapter.weights.transformer.h.0.attn.c_attn.lora_A"


def _adapter(rank: int = 2, seed: int = 0) -> Adapter:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    weights = {"transformer": {"h": {"0": {"attn": {"c_attn": {
        "lora_A": jax.random.normal(k1, (8, rank)), "lora_B": jax.random.normal(k2, (rank, 24))}}}}}}
    return Adapter(weights, LoraConfig(rank=rank, target_modules=["c_attn"]))


def _state(step: int = 5, rank: int = 2, key=None) -> TrainState:
    adapter = _adapter(rank)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(adapter)
    # One real update so mu, nu and count are non-trivial values, not zeros.
    grads = jax.tree.map(lambda x: 0.5 * x, adapter)
    _, opt_state = tx.update(grads, opt_state, adapter)
    return TrainState(step=step, adapter=adapter, opt_state=opt_state,
                      rng_key=jax.random.PRNGKey(11) if key is None else key,
                      examples_seen=4 * step, losses=tuple(0.1 * i + 1 / 3 for i in range(step)),
                      evals=((0, 3.25), (step, 1 / 7)), history=({"event": "start", "step": 0},))


def _assert_trees_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bit-exact: safetensors stores raw bytes


def test_round_trip_is_bit_exact_for_adapter_optimizer_rng_position_and_history(tmp_path):
    state = _state()
    back = restore_checkpoint(save_checkpoint(tmp_path, state, CONFIG), _state(step=0), CONFIG)
    assert (back.step, back.examples_seen) == (5, 20)
    assert back.losses == state.losses  # python floats survive JSON exactly
    assert back.evals == ((0, 3.25), (5, 1 / 7))
    assert back.history == ({"event": "start", "step": 0},)
    assert isinstance(back.adapter, Adapter) and back.adapter.config == state.adapter.config
    _assert_trees_identical(back.adapter, state.adapter)
    _assert_trees_identical(back.opt_state, state.opt_state)
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(state.opt_state)
    assert np.array_equal(back.rng_key, state.rng_key)


def test_typed_prng_keys_round_trip(tmp_path):
    state = _state(key=jax.random.key(3))
    back = restore_checkpoint(save_checkpoint(tmp_path, state, CONFIG), state, CONFIG)
    assert jnp.issubdtype(back.rng_key.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(back.rng_key), jax.random.key_data(state.rng_key))


def test_manifest_lists_every_tensor_and_the_digest_of_the_tensor_file(tmp_path):
    import hashlib

    path = save_checkpoint(tmp_path, _state(), CONFIG)
    manifest = json.loads((path / tc.MANIFEST_FILE).read_text())
    tensors = manifest["tensors"]
    assert tensors[A_NAME] == {"shape": [8, 2], "dtype": "float32"}
    assert tensors["rng_key"] == {"shape": [2], "dtype": "uint32"}
    # clip_by_global_norm has an empty state; adamw has (count, mu, nu) + the weight-decay/lr empties.
    assert sum(n.startswith("opt_state.") for n in tensors) == 5  # count + 2 mu + 2 nu
    assert manifest["step"] == 5 and manifest["run_config"] == CONFIG and manifest["version"] == 2
    data = (path / tc.TENSORS_FILE).read_bytes()
    assert manifest["files"] == {tc.TENSORS_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert manifest["manifest_sha256"] == tc._manifest_digest(manifest)


def test_files_and_directories_get_umask_modes_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", _state(), CONFIG)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (path, path / tc.MANIFEST_FILE, path / tc.TENSORS_FILE)}
    assert modes == {path.name: 0o755, tc.MANIFEST_FILE: 0o644, tc.TENSORS_FILE: 0o644}  # was 0o700 / 0o600


def test_keeps_only_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step=step), CONFIG, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_saving_an_older_step_removes_the_newer_ones_of_the_rewound_run(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _state(step=step), CONFIG, keep=3)
    save_checkpoint(tmp_path, _state(step=5), CONFIG, keep=3)  # resumed from step 4 after step 6 was damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, _state(step=1), CONFIG)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tc.safetensors.numpy, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, _state(step=2), CONFIG)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_dir_of_a_killed_save_is_ignored_and_removed_by_the_next_save(tmp_path):
    good = save_checkpoint(tmp_path, _state(step=1), CONFIG)
    stale = tmp_path / f".step_00000002.tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / tc.TENSORS_FILE).write_bytes(b"truncated")
    live = tmp_path / f".step_00000009.tmp-{os.getpid()}-0123abcd"  # a save in progress: not ours to remove
    live.mkdir()
    assert latest_checkpoint(tmp_path) == good and latest_intact_checkpoint(tmp_path).path == good
    save_checkpoint(tmp_path, _state(step=2), CONFIG)
    assert not stale.exists() and live.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, _state(step=2), CONFIG)
    path = save_checkpoint(tmp_path, _state(step=2)._replace(examples_seen=99), CONFIG)
    assert restore_checkpoint(path, _state(), CONFIG).examples_seen == 99
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


def test_latest_checkpoint_of_missing_or_empty_root_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    assert latest_intact_checkpoint(tmp_path) == (None, ())


@pytest.mark.parametrize("field, value", [("adapter", "nan"), ("opt_state", "inf"), ("losses", "nan"),
                                          ("evals", "nan")])
def test_a_non_finite_state_is_never_written(tmp_path, field, value):
    good = save_checkpoint(tmp_path, _state(step=1), CONFIG)
    state = _state(step=2)
    bad = float(value)
    if field in ("adapter", "opt_state"):
        state = state._replace(**{field: jax.tree.map(lambda x: x * bad if x.dtype == jnp.float32 else x,
                                                      getattr(state, field))})
    elif field == "losses":
        state = state._replace(losses=state.losses[:-1] + (bad,))
    else:
        state = state._replace(evals=((0, 3.0), (2, bad)))
    with pytest.raises(NonFiniteStateError, match=f"Refusing to save step 2: .*{field[:3]}"):
        save_checkpoint(tmp_path, state, CONFIG)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]


def test_config_mismatch_names_the_setting_and_no_command_line_flag(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"rank: checkpoint 2, this run 4") as info:
        restore_checkpoint(path, _state(), dict(CONFIG, rank=4))
    assert "--" not in str(info.value)  # the library speaks in its own terms; the example adds the flags


def test_lr_and_clip_norm_may_differ_when_the_caller_allows_it(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    changed = dict(CONFIG, lr=1e-4, clip_norm=0.5)
    with pytest.raises(CheckpointMismatchError, match=r"clip_norm: checkpoint 1.0, this run 0.5.*\n.*lr: checkpoint"):
        restore_checkpoint(path, _state(), changed)
    back = restore_checkpoint(path, _state(step=0), changed, may_differ=("lr", "clip_norm"))
    _assert_trees_identical(back.opt_state, _state().opt_state)  # Adam's moments and count carry over
    with pytest.raises(CheckpointMismatchError, match="rank: checkpoint 2, this run 4"):
        restore_checkpoint(path, _state(), dict(changed, rank=4), may_differ=("lr", "clip_norm"))


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path, _state(rank=2), CONFIG)
    with pytest.raises(CheckpointMismatchError, match=r"c_attn.lora_A: checkpoint .*\[8, 2\].*\[8, 4\]"):
        restore_checkpoint(path, _state(rank=4), CONFIG)


def test_missing_tensor_is_reported(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    template = _state()
    weights = {"transformer": dict(template.adapter.weights["transformer"],
                                   wte={"lora_A": jnp.zeros((3, 2)), "lora_B": jnp.zeros((2, 3))})}
    extra = Adapter(weights, template.adapter.config)
    with pytest.raises(CheckpointMismatchError, match="missing tensor adapter.weights.transformer.wte.lora_A"):
        restore_checkpoint(path, template._replace(adapter=extra), CONFIG)


def test_unknown_format_version_is_a_mismatch_not_damage(tmp_path):
    path = save_checkpoint(tmp_path, _state(), CONFIG)
    manifest = json.loads((path / tc.MANIFEST_FILE).read_text())
    manifest["version"] = 99
    manifest["manifest_sha256"] = tc._manifest_digest(manifest)  # a consistent file of another version
    (path / tc.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="version 99"):
        restore_checkpoint(path, _state(), CONFIG)


def test_keep_below_one_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, _state(), CONFIG, keep=0)


def _truncate(path):
    file = path / tc.TENSORS_FILE
    file.write_bytes(file.read_bytes()[:-100])


def _flip_exponent_bit(path):
    file = path / tc.TENSORS_FILE
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8:8 + header_len])[A_NAME]["data_offsets"][0]
    before = np.frombuffer(bytes(data[start:start + 4]), np.float32)[0]
    data[start + 2] ^= 0x80  # the lowest exponent bit of lora_A[0, 0] (little-endian): x2 or /2, still finite
    after = np.frombuffer(bytes(data[start:start + 4]), np.float32)[0]
    assert np.isfinite(after) and abs(after) in (2 * abs(before), abs(before) / 2)
    file.write_bytes(bytes(data))


def _edit_manifest_value(path):
    file = path / tc.MANIFEST_FILE
    manifest = json.loads(file.read_text())
    manifest["examples_seen"] += 4  # valid JSON, wrong data position
    file.write_text(json.dumps(manifest))


def _cut_manifest(path):
    (path / tc.MANIFEST_FILE).write_text('{"format": "lora-parity-tr', encoding="utf-8")


def _list_manifest(path):
    (path / tc.MANIFEST_FILE).write_text("[1, 2]", encoding="utf-8")


@pytest.mark.parametrize("damage, reason", [
    (_truncate, r"state\.safetensors has \d+ bytes, \d+ were saved"),
    (_flip_exponent_bit, r"state\.safetensors does not match its SHA-256"),
    (_edit_manifest_value, r"manifest\.json does not match its own SHA-256"),
    (_cut_manifest, r"manifest\.json is not valid JSON"),
    (_list_manifest, r"must hold a JSON object, got list"),
])
def test_damage_is_detected_and_the_newest_intact_checkpoint_is_used(tmp_path, damage, reason):
    older = save_checkpoint(tmp_path, _state(step=2), CONFIG)
    newest = save_checkpoint(tmp_path, _state(step=4), CONFIG)
    damage(newest)
    assert latest_checkpoint(tmp_path) == newest  # unverified: the name alone
    with pytest.raises(CheckpointDamagedError, match=reason):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointDamagedError, match=reason):
        restore_checkpoint(newest, _state(), CONFIG)
    found = latest_intact_checkpoint(tmp_path)
    assert found.path == older and [p for p, _ in found.damaged] == [newest]
    assert restore_checkpoint(found.path, _state(), CONFIG).step == 2


def test_a_step_directory_without_manifest_counts_as_damaged(tmp_path):
    older = save_checkpoint(tmp_path, _state(step=2), CONFIG)
    newest = save_checkpoint(tmp_path, _state(step=4), CONFIG)
    (newest / tc.MANIFEST_FILE).unlink()
    found = latest_intact_checkpoint(tmp_path)
    assert found.path == older and "no manifest.json" in found.damaged[0][1]


def test_tensor_file_that_disagrees_with_its_manifest_is_refused(tmp_path):
    import hashlib

    from safetensors.numpy import load_file, save_file

    path = save_checkpoint(tmp_path, _state(), CONFIG)
    arrays = load_file(path / tc.TENSORS_FILE)
    arrays["rng_key"] = np.zeros(3, np.uint32)  # the manifest still says shape [2]
    save_file(arrays, path / tc.TENSORS_FILE)
    manifest = json.loads((path / tc.MANIFEST_FILE).read_text())  # digests made to match, as a forger would
    data = (path / tc.TENSORS_FILE).read_bytes()
    manifest["files"][tc.TENSORS_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["manifest_sha256"] = tc._manifest_digest(manifest)
    (path / tc.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match=r"rng_key: state\.safetensors holds .*\[3\].*expected .*\[2\]"):
        restore_checkpoint(path, _state(), CONFIG)
