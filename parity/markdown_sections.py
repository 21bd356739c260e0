"""Named, regenerable sections inside a hand-written Markdown page.

``python -m parity --markdown docs/parity.md --section embedded`` replaces only the text
between ``<!-- parity:embedded:begin -->`` and ``<!-- parity:embedded:end -->``, so the
prose around the generated tables (tolerances and why) survives every regeneration.
"""

from __future__ import annotations

import re


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- parity:{name}:begin -->", f"<!-- parity:{name}:end -->"


def upsert_section(page: str, name: str, body: str) -> str:
    """``page`` with section ``name`` set to ``body`` (appended at the end when absent).

    >>> page = upsert_section("# Title\\n", "cpu", "old\\n")
    >>> page = upsert_section(page, "cpu", "new\\n")
    >>> page.count("parity:cpu:begin"), "old" in page, "new" in page
    (1, False, True)
    >>> upsert_section("", "bad name", "x")
    Traceback (most recent call last):
    ...
    ValueError: Section name 'bad name' must match [A-Za-z0-9_-]+ (it is embedded in an HTML comment).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"Section name {name!r} must match [A-Za-z0-9_-]+ (it is embedded in an HTML comment).")
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    start, stop = page.find(begin), page.find(end)
    if start == -1 or stop == -1:
        separator = "" if not page or page.endswith("\n\n") else ("\n" if page.endswith("\n") else "\n\n")
        return page + separator + block
    return page[:start] + block + page[stop + len(end):].removeprefix("\n")
