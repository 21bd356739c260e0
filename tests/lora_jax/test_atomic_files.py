"""Atomic replacement: a failed write leaves the old file and no temporary file behind."""

import pytest

from lora_jax.atomic_files import atomic_write, atomic_write_text


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
