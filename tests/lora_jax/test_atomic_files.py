"""``lora_jax.atomic_files`` re-exports ``lora_format.atomic``; the behaviour is tested in tests/lora_format/test_atomic.py."""

import pytest

from lora_format import atomic
from lora_jax import atomic_files


@pytest.mark.parametrize("name", atomic_files.__all__)
def test_each_exported_name_is_the_shared_implementation(name):
    assert getattr(atomic_files, name) is getattr(atomic, name)


def test_exports_are_unchanged():
    assert atomic_files.__all__ == [
        "atomic_write", "atomic_write_text", "current_umask", "fsync_path", "make_dir", "remove_stale_temps",
        "replace_dir", "temp_sibling",
    ]
    assert atomic_files.STALE_AFTER_S == 3600.0
