"""Adapter directories: whole-directory atomic saves, pinned reads, the config digest, leftovers, modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load, save_file

from lora_format import adapter_dir
from lora_format.atomic import make_dir
from lora_format.adapter_dir import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    encode_config,
    open_adapter_dir,
    read_adapter_files,
    save_adapter_dir,
    weights_metadata,
)


def writer(alpha: float, value: float, *, digest: bool = True):
    """Returns a ``write_files`` for a toy adapter whose alpha and tensor values identify it."""
    config = encode_config({"peft_type": "LORA", "r": 2, "lora_alpha": alpha})

    def write_files(directory):
        tensors = {"base_model.model.0.lora_A.weight": np.full((2, 4), value, np.float32)}
        metadata = weights_metadata(config) if digest else {"format": "pt"}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)  # safetensors writes 0o600 files
        (directory / CONFIG_NAME).write_bytes(config)

    return write_files


def read(path) -> tuple[float, set[float]]:
    """Returns (lora_alpha, the set of tensor values) of the adapter at ``path``, through the pinned reader."""
    files = read_adapter_files(path)
    tensors = load(files.weights)
    return json.loads(files.config)["lora_alpha"], {float(v) for t in tensors.values() for v in np.unique(t)}


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped, so the pid names no process (as after a SIGKILL)
    return child.pid


def test_save_replaces_the_whole_directory_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "runs" / "adapter"  # parents are created
    assert save_adapter_dir(target, writer(8.0, 1.0)) == target
    assert read(target) == (8.0, {1.0})
    save_adapter_dir(target, writer(16.0, 2.0))
    assert read(target) == (16.0, {2.0})
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter_dir(tmp_path / "adapter", writer(8.0, 1.0))
        save_adapter_dir(tmp_path / "adapter", writer(16.0, 2.0))
    finally:
        os.umask(old)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "adapter").iterdir()}
    assert modes == {CONFIG_NAME: "0o644", WEIGHTS_NAME: "0o644"}
    assert oct(stat.S_IMODE((tmp_path / "adapter").stat().st_mode)) == "0o755"


def test_failed_write_changes_nothing(tmp_path):
    target = tmp_path / "adapter"
    save_adapter_dir(target, writer(8.0, 1.0))

    def fail(directory):
        writer(16.0, 2.0)(directory)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter_dir(target, fail)
    assert read(target) == (8.0, {1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_stale_temps_are_removed_by_the_next_save_and_live_ones_kept(tmp_path):
    target = tmp_path / "adapter"
    save_adapter_dir(target, writer(8.0, 1.0))
    dead = tmp_path / f".adapter.tmp-{dead_pid()}-0a1b2c3d"  # a writer SIGKILLed mid-save
    old = tmp_path / f".adapter.tmp-{os.getpid()}-1a1b2c3d"  # a live pid, but two hours old: pid reused
    live = tmp_path / f".adapter.tmp-{os.getpid()}-2a1b2c3d"  # a save in progress in this process
    for leftover in (dead, old, live):
        leftover.mkdir()
        (leftover / CONFIG_NAME).write_text('{"peft_type": "LO')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    other = tmp_path / f".other.tmp-{dead_pid()}-3a1b2c3d"  # another target's temporary is not ours to remove
    other.mkdir()
    save_adapter_dir(target, writer(16.0, 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", live.name, other.name])


def test_loaders_never_read_temps_and_name_them_when_the_target_is_missing(tmp_path):
    leftover = tmp_path / f".adapter.tmp-{dead_pid()}-0a1b2c3d"
    leftover.mkdir()
    writer(8.0, 1.0)(leftover)
    with pytest.raises(FileNotFoundError, match=rf"adapter does not exist; .*left \['{leftover.name}'\].* rename it "
                                                "to adapter"):
        read_adapter_files(tmp_path / "adapter")


def test_readme_is_carried_over_and_other_files_are_refused_before_writing(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "README.md").write_text("model card")
    save_adapter_dir(target, writer(8.0, 1.0))
    assert (target / "README.md").read_text() == "model card"
    (target / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ValueError, match=r"holds files that are not part of an adapter: \['tokenizer.json'\]\. "
                                         r"Saving replaces the whole directory, so nothing was written\. Save the "
                                         r"adapter into its own directory"):
        save_adapter_dir(target, writer(16.0, 2.0))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_file_at_the_target_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory; an adapter is a directory"):
        save_adapter_dir(tmp_path / "adapter", writer(8.0, 1.0))
    assert (tmp_path / "adapter").read_text() == "not a directory"


def test_a_symlinked_target_replaces_the_directory_it_points_to(tmp_path):
    (tmp_path / "run3").mkdir()
    (tmp_path / "latest").symlink_to("run3")
    save_adapter_dir(tmp_path / "latest", writer(8.0, 1.0))
    assert (tmp_path / "latest").is_symlink() and read(tmp_path / "run3") == (8.0, {1.0})


def test_config_and_weights_of_different_saves_are_refused(tmp_path):
    save_adapter_dir(tmp_path / "one", writer(8.0, 1.0))
    save_adapter_dir(tmp_path / "two", writer(16.0, 2.0))
    (tmp_path / "two" / CONFIG_NAME).write_bytes((tmp_path / "one" / CONFIG_NAME).read_bytes())
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'two'}: adapter_config.json and adapter_model.safetensors "
                                         "come from different saves"):
        read_adapter_files(tmp_path / "two")


def test_weights_without_a_digest_load_as_peft_saves_them(tmp_path):
    save_adapter_dir(tmp_path / "peft", writer(8.0, 1.0, digest=False))
    files = read_adapter_files(tmp_path / "peft")
    assert CONFIG_DIGEST_KEY not in files.weights[:200].decode("latin-1")
    assert read(tmp_path / "peft") == (8.0, {1.0})


def test_a_pinned_reader_keeps_reading_the_save_it_opened(tmp_path):
    target = tmp_path / "adapter"
    save_adapter_dir(target, writer(8.0, 1.0))
    with open_adapter_dir(target) as pinned:
        save_adapter_dir(target, writer(16.0, 2.0))  # swapped in, and the old directory deleted, mid-read
        config, weights = pinned.read_bytes(CONFIG_NAME), pinned.read_bytes(WEIGHTS_NAME)
    assert json.loads(config)["lora_alpha"] == 8.0
    assert {float(v) for t in load(weights).values() for v in np.unique(t)} == {1.0}
    assert read(target) == (16.0, {2.0})


def test_without_rename_exchange_the_fallback_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_dir, "_exchange", lambda first, second: False)  # as on macOS or an old filesystem
    target = tmp_path / "adapter"
    save_adapter_dir(target, writer(8.0, 1.0))
    save_adapter_dir(target, writer(16.0, 2.0))
    assert read(target) == (16.0, {2.0})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_concurrent_saves_and_reads_never_mix(tmp_path):
    target = tmp_path / "adapter"
    save_adapter_dir(target, writer(8.0, 1.0))
    stop, reads, mixes, errors = threading.Event(), [], [], []

    def save_many(alpha, value):
        try:
            for _ in range(60):
                save_adapter_dir(target, writer(alpha, value))
        except Exception as err:  # noqa: BLE001 - asserted empty below
            errors.append(err)

    def read_many():
        while not stop.is_set():
            try:
                alpha, values = read(target)
            except Exception as err:  # noqa: BLE001 - a mix shows up as the digest error
                errors.append(err)
                continue
            reads.append(alpha)
            if values != {alpha / 8.0}:
                mixes.append((alpha, values))

    writers = [threading.Thread(target=save_many, args=args) for args in ((8.0, 1.0), (16.0, 2.0))]
    reader = threading.Thread(target=read_many)
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert (errors, mixes) == ([], [])
    assert len(reads) >= 20 and set(reads) <= {8.0, 16.0}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_no_deep_learning_framework_is_imported():
    code = "import sys, lora_format.adapter_dir; print(sorted({'torch', 'jax', 'flax'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.stdout == "[]\n"


def _write_named(directory, names):
    from lora_format.adapter_dir import named_adapter_subdir
    for name in names:
        sub = named_adapter_subdir(directory, name)
        sub.mkdir(exist_ok=True)
        config = encode_config({"peft_type": "LORA", "name": name})
        save_file({"w": np.zeros(2, np.float32)}, str(sub / WEIGHTS_NAME), metadata=weights_metadata(config))
        (sub / CONFIG_NAME).write_bytes(config)


def test_a_multi_adapter_save_is_peft_layout_and_replaces_the_previous_set_whole(tmp_path):
    from lora_format.adapter_dir import read_named_adapter_files
    target = tmp_path / "set"
    save_adapter_dir(target, lambda new: _write_named(new, ["default", "task_b", "task_c"]))
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "task_b", "task_c"]
    save_adapter_dir(target, lambda new: _write_named(new, ["default", "task_d"]))  # old subfolders are allowed
    files = read_named_adapter_files(target)
    assert list(files) == ["default", "task_d"]
    assert json.loads(files["task_d"].config)["name"] == "task_d"
    assert not (target / "task_b").exists()


def test_a_foreign_subdirectory_is_not_replaced(tmp_path):
    target = tmp_path / "set"
    save_adapter_dir(target, lambda new: _write_named(new, ["default"]))
    (target / "notes").mkdir()
    (target / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not part of an adapter: \['notes'\]"):
        save_adapter_dir(target, lambda new: _write_named(new, ["default"]))
    assert (target / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden", CONFIG_NAME, 3])
def test_adapter_names_that_cannot_be_subdirectories_are_refused(bad):
    from lora_format.adapter_dir import check_adapter_name
    with pytest.raises(ValueError, match="cannot name a subdirectory"):
        check_adapter_name(bad)


def test_a_config_without_weights_is_named_at_once(tmp_path, monkeypatch):
    from lora_format.adapter_dir import read_named_adapter_files
    (tmp_path / CONFIG_NAME).write_bytes(encode_config({"peft_type": "LORA"}))
    calls = []
    read_once = adapter_dir._read_named_once
    monkeypatch.setattr(adapter_dir, "_read_named_once", lambda path: calls.append(path) or read_once(path))
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}; it is not a PEFT adapter directory"):
        read_named_adapter_files(tmp_path)
    assert len(calls) == 1  # no retries: nothing was swapped, a file is missing


def test_a_directory_swapped_out_while_its_files_are_deleted_is_read_again(tmp_path, monkeypatch):
    # The race CI hit: a reader opens the old directory, a save swaps it out and starts deleting it, and the
    # reader finds its config but not its weights. That is not a broken adapter: the reader must read again.
    from lora_format.adapter_dir import read_named_adapter_files
    target = tmp_path / "set"
    save_adapter_dir(target, writer(8.0, 1.0))
    listdir, swapped = os.listdir, []

    def listdir_then_swap(fd):
        names = listdir(fd)
        if not swapped:  # between the reader's open of the root and its open of the files
            swapped.append(True)
            fresh = make_dir(tmp_path / "fresh")
            writer(16.0, 2.0)(fresh)
            assert adapter_dir._exchange(fresh, target)  # the new save is in; ``fresh`` now holds the old one
            (fresh / WEIGHTS_NAME).unlink()  # and its deletion has begun: weights gone, config not yet
        return names

    monkeypatch.setattr(adapter_dir.os, "listdir", listdir_then_swap)
    files = read_named_adapter_files(target)
    assert swapped and json.loads(files["default"].config)["lora_alpha"] == 16.0
