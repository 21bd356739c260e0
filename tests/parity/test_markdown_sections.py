"""Regenerating one section keeps the rest of a page byte for byte."""

from __future__ import annotations

from parity.markdown_sections import upsert_section


def test_replacing_a_middle_section_keeps_text_around_it():
    page = "# P\n\n" + upsert_section("", "a", "one\n") + "\n## Tolerances\n\nwhy\n"
    page = upsert_section(page, "b", "two\n")
    updated = upsert_section(page, "a", "ONE\n")
    assert updated.replace("ONE", "one") == page
    assert updated.index("ONE") < updated.index("## Tolerances") < updated.index("two")
