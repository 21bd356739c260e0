"""Texts every CPython installation already has, used as offline training data.

- The base corpus is ``pydoc_data.topics``: the language reference sections that ``help()``
  prints, about 465 KB of technical English prose.
- The fine-tune target is a text of a clearly different register: the Python license
  (``LICENSE.txt`` in the standard library directory, legal prose), or, where a distribution
  strips it, IDLE's change log. A LoRA fine-tune on it visibly shifts the model's style.

Both are plain functions of the running interpreter, so they are the same on every run of the
same Python; ``text_sha256`` records which text a cached model was trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

# Tried in order; the first that exists is the target text.
TARGET_CANDIDATES = ("LICENSE.txt", "idlelib/NEWS2x.txt", "idlelib/NEWS.txt", "idlelib/News3.txt")
HELDOUT_FRACTION = 0.15


def base_corpus() -> str:
    """The base pre-training text: every ``pydoc_data.topics`` entry, in key order.

    >>> len(base_corpus()) > 100_000
    True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def target_path() -> Path:
    """The file ``target_corpus`` reads.

    Raises:
        FileNotFoundError: None of ``TARGET_CANDIDATES`` exists in the standard library directory.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for candidate in TARGET_CANDIDATES:
        if (stdlib / candidate).is_file():
            return stdlib / candidate
    raise FileNotFoundError(
        f"None of {', '.join(TARGET_CANDIDATES)} exists under {stdlib}; this Python ships without them. "
        "Fine-tune on your own text instead."
    )


def target_corpus() -> tuple[str, str]:
    """The fine-tune text split into ``(train, heldout)``; held-out is the last 15%.

    The split falls on a line boundary so no word is cut in half.

    >>> train, heldout = target_corpus()
    >>> 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.2
    True
    """
    text = target_path().read_text(encoding="utf-8", errors="replace")
    cut = int(len(text) * (1.0 - HELDOUT_FRACTION))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 text, to record which corpus a model saw.

    >>> text_sha256("abc")[:12]
    'ba7816bf8f01'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
