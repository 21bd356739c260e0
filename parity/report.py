"""A parity report: rows plus where they were measured, rendered as text, Markdown or JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from parity.results import CheckResult


@dataclass(frozen=True)
class ParityReport:
    """Every row of a run and the context needed to reproduce it.

    Attributes:
        rows: The check results, in the order they ran.
        environment: Device, dtype, package versions (:func:`parity.environment.describe_environment`).
        settings: Model, targets, rank, alpha and the other run settings.
        command: The command line that produced the report, when run from the CLI.
        arrays: Arrays the checks computed (logits, losses), for ``--dump``; not in the JSON.
    """

    rows: tuple[CheckResult, ...]
    environment: dict
    settings: dict = field(default_factory=dict)
    command: str | None = None
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """True when there is at least one row and every row passed."""
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The rows that failed."""
        return tuple(row for row in self.rows if not row.passed)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"passed": self.passed, "command": self.command, "environment": self.environment,
                "settings": self.settings, "rows": [row.as_dict() for row in self.rows]}


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "0" if value == 0 else f"{value:.2e}"


def _row_cells(row: CheckResult) -> list[str]:
    return [row.stage, row.name, _number(row.max_abs), _number(row.max_rel), row.tolerance.describe(),
            "PASS" if row.passed else "FAIL", row.detail]


_HEADER = ["stage", "check", "max abs", "max rel", "tolerance", "result", "detail"]


def _context_lines(report: ParityReport) -> list[str]:
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [f"device: {env.get('device')} ({env.get('device_name')}), dtype: {env.get('dtype')}",
             f"python {env.get('python')} on {env.get('platform')}", f"versions: {versions}"]
    if report.settings:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in report.settings.items()))
    return lines


def render_table(report: ParityReport) -> str:
    """A fixed-width table for the terminal, with the context on top and a verdict below."""
    body = [_HEADER] + [_row_cells(row) for row in report.rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(_HEADER) - 1)]
    text = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " | " + line[-1] for line in body]
    text.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)
    verdict = (f"PASS: all {len(report.rows)} rows within tolerance" if report.passed
               else f"FAIL: {len(report.failures)} of {len(report.rows)} rows out of tolerance")
    return "\n".join(_context_lines(report) + [""] + text + ["", verdict]) + "\n"


def render_markdown(report: ParityReport, title: str = "Parity report") -> str:
    """A Markdown section: context, the command, the table."""
    lines = [f"## {title}", ""]
    if report.command:
        lines += ["```", report.command, "```", ""]
    lines += [f"- {line}" for line in _context_lines(report)]
    verdict = "all checks passed" if report.passed else f"{len(report.failures)} checks FAILED"
    lines += [f"- result: **{verdict}** ({len(report.rows)} rows)", ""]
    lines.append("| " + " | ".join(_HEADER) + " |")
    lines.append("|" + "---|" * len(_HEADER))
    for row in report.rows:
        cells = [cell.replace("|", "\\|") for cell in _row_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_json(report: ParityReport) -> str:
    """The report as indented JSON (NaN written as null)."""
    return json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a temp file beside ``path``, then renames it over ``path``.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    from lora_torch.tensor_files import atomic_destination

    with atomic_destination(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
