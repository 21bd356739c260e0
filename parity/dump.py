"""``--dump DIR``: the batch and every half's logits as ``.npy`` files, for inspection outside parity."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# The files --dump promises: the int (batch, seq) batch and float32 (batch, seq, vocab) logits.
DUMP_NAMES = ("input_ids", "torch_base_logits", "jax_base_logits", "torch_lora_logits", "jax_lora_logits",
              "torch_merged_logits", "jax_merged_logits")
# With several named adapters (their stages ran): the mixed batch, its logits and names, the cat combination's logits.
MULTI_DUMP_NAMES = ("mixed_input_ids", "jax_mixed_logits", "torch_mixed_logits", "jax_combined_cat_logits",
                    "torch_combined_cat_logits")
MIXED_NAMES_FILE = "mixed_adapter_names.json"


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temp file beside ``path``, then rename: never a truncated ``.npy``."""
    from lora_torch.tensor_files import atomic_destination

    with atomic_destination(path) as tmp, tmp.open("wb") as handle:  # a handle: np.save(path) would add .npy
        np.save(handle, array, allow_pickle=False)


def dump_arrays(out_dir: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Writes the :data:`DUMP_NAMES` arrays present in ``arrays``; returns the names that were missing.

    A name is missing when its stage did not run or failed before computing it.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     missing = dump_arrays(d, {"input_ids": np.zeros((1, 2), np.int64)})
    ...     sorted(os.listdir(d)), len(missing)
    (['input_ids.npy'], 6)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = []
    multi = "mixed_adapter_names" in arrays
    for name in DUMP_NAMES + (MULTI_DUMP_NAMES if multi else ()):
        if name not in arrays:
            missing.append(name)
            continue
        dtype = np.int64 if name.endswith("input_ids") else np.float32
        save_npy_atomic(out / f"{name}.npy", np.asarray(arrays[name], dtype=dtype))
    if multi:
        from parity.report import write_text_atomic

        write_text_atomic(out / MIXED_NAMES_FILE, json.dumps(list(arrays["mixed_adapter_names"])) + "\n")
    return missing
