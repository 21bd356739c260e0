"""Atomic replacement: a failed or killed write leaves the old file; new files get the umask's modes."""

import os
import subprocess
import sys

import pytest

from lora_jax.atomic_files import atomic_write, atomic_write_text, remove_stale_temps, replace_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_write_replaces_the_file_and_leaves_only_it(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old", encoding="utf-8")
    atomic_write_text(target, "new contents")
    assert target.read_text(encoding="utf-8") == "new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")

    def fails_halfway(temp_name):
        with open(temp_name, "w", encoding="utf-8") as file:
            file.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_halfway)
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_new_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    atomic_write_text(tmp_path / "results.json", "{}\n")
    # A writer that recreates the file privately (as safetensors' save_file does) is corrected too.
    atomic_write(tmp_path / "w.bin", lambda name: (os.unlink(name), os.close(os.open(name, os.O_CREAT | os.O_WRONLY,
                                                                                    0o600))))
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"results.json": 0o644, "w.bin": 0o644}


def test_temp_left_by_a_killed_writer_is_removed_by_the_next_write_of_that_file(tmp_path):
    stale = tmp_path / f".results.json.tmp-{_dead_pid()}-0a1b2c3d"
    stale.write_text("half", encoding="utf-8")
    live = tmp_path / f".results.json.tmp-{os.getpid()}-0a1b2c3d"  # a writer that is still at work
    live.write_text("busy", encoding="utf-8")
    other = tmp_path / f".loss.png.tmp-{_dead_pid()}-0a1b2c3d"  # another target's: left for its own writer
    other.write_text("half", encoding="utf-8")
    atomic_write_text(tmp_path / "results.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "results.json"])
    assert remove_stale_temps(tmp_path) == [other]


def test_replace_dir_swaps_a_whole_directory_and_drops_the_old_one(tmp_path):
    target, new = tmp_path / "checkpoints", tmp_path / "next"
    target.mkdir()
    (target / "old").write_text("old", encoding="utf-8")
    new.mkdir()
    (new / "new").write_text("new", encoding="utf-8")
    replace_dir(new, target)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]
    assert [p.name for p in target.iterdir()] == ["new"]
