"""Atomic replacement: a failed or killed write leaves the old file; new files get the umask's modes.

Also the rules both halves share: temporary names, which temporaries count as stale, the directory
swap and its fallback without ``RENAME_EXCHANGE``.
"""

import os
import subprocess
import sys

import pytest

from lora_format import atomic
from lora_format.atomic import (
    atomic_destination,
    atomic_write,
    atomic_write_text,
    exchange,
    remove_stale_temps,
    replace_dir,
    temp_sibling,
)


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


@pytest.mark.parametrize("rename_exchange", [True, False])
def test_replace_dir_swaps_a_whole_directory_and_drops_the_old_one(tmp_path, monkeypatch, rename_exchange):
    if not rename_exchange:
        monkeypatch.setattr(atomic, "exchange", lambda first, second: False)  # as on macOS or an old filesystem
    target, new = tmp_path / "checkpoints", tmp_path / "next"
    target.mkdir()
    (target / "old").write_text("old", encoding="utf-8")
    new.mkdir()
    (new / "new").write_text("new", encoding="utf-8")
    replace_dir(new, target)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]
    assert [p.name for p in target.iterdir()] == ["new"]


def test_replace_dir_renames_into_a_free_name(tmp_path):
    new = tmp_path / "next"
    new.mkdir()
    (new / "a").write_text("a", encoding="utf-8")
    replace_dir(new, tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (tmp_path / "run" / "a").read_text(encoding="utf-8") == "a"


def test_exchange_swaps_two_files_or_reports_it_cannot(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("1", encoding="utf-8")
    second.write_text("2", encoding="utf-8")
    swapped = exchange(first, second)
    expected = ("2", "1") if swapped else ("1", "2")
    assert (first.read_text(encoding="utf-8"), second.read_text(encoding="utf-8")) == expected
    if sys.platform.startswith("linux"):
        assert swapped  # glibc >= 2.28 on a local filesystem
        with pytest.raises(FileNotFoundError):
            exchange(first, tmp_path / "missing")


def test_temp_sibling_names_are_fresh_and_hidden(tmp_path):
    names = {temp_sibling(tmp_path / "w.json").name for _ in range(50)}
    assert len(names) == 50
    assert all(name.startswith(f".w.json.tmp-{os.getpid()}-") for name in names)


def test_stale_rule_old_temps_of_live_writers_and_only_the_named_target(tmp_path):
    old_live = tmp_path / f".a.json.tmp-{os.getpid()}-0a1b2c3d"
    old_live.write_text("", encoding="utf-8")
    os.utime(old_live, (0, 0))  # older than STALE_AFTER_S: abandoned even though its writer lives
    fresh_live = tmp_path / f".a.json.tmp-{os.getpid()}-11111111"
    fresh_live.write_text("", encoding="utf-8")
    dead_other = tmp_path / f".b.json.tmp-{_dead_pid()}-0a1b2c3d"
    dead_other.mkdir()  # directories count as well
    not_ours = tmp_path / ".a.json.tmp-x-0a1b2c3d"
    not_ours.write_text("", encoding="utf-8")
    assert remove_stale_temps(tmp_path, "a.json") == [old_live]
    assert remove_stale_temps(tmp_path) == [dead_other]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh_live.name, not_ours.name])
    assert remove_stale_temps(tmp_path / "missing") == []


def test_atomic_destination_creates_parents_and_gives_the_usual_mode(tmp_path, umask_022):
    target = tmp_path / "runs" / "metrics.json"
    with atomic_destination(target) as temp:
        assert temp.parent == target.parent and (temp.stat().st_mode & 0o777) == 0o600
        temp.write_text("{}", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_atomic_destination_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(OSError, match="disk full"):
        with atomic_destination(target) as temp:
            temp.write_text("half", encoding="utf-8")
            raise OSError("disk full")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]

