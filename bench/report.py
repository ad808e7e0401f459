"""What a section produces (tables of rows, targets, raw results) and how it is written out."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import Result

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NA = "-"  # a cell with nothing to say


@dataclass(frozen=True)
class Row:
    """One line of a table, already formatted, in the table's column order."""

    cells: tuple[str, ...]


@dataclass
class Table:
    columns: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    caption: str = ""

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row {cells} does not match the columns {self.columns}")
        self.rows.append(Row(tuple(cells)))

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row.cells) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One performance target, as measured: passed is None when this run did not measure it."""

    name: str
    measured: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        return {True: "**PASS**", False: "**FAIL**", None: "n/a"}[self.passed]


@dataclass
class Section:
    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    error: str | None = None
    markdown_extra: str = ""  # a hook section may hand in finished markdown

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.error is not None:
            parts.append(f"**The section failed:** `{self.error}`")
        parts += [t.markdown() for t in self.tables]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        if self.markdown_extra:
            parts.append(self.markdown_extra.strip())
        return "\n\n".join(parts)


# --------------------------------------------------------------------------- formatting


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return NA
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def fmt_rate(nbytes: int, seconds: float) -> str:
    """Decimal GB/s, as the kernel notes quote them."""
    if seconds <= 0 or math.isnan(seconds):
        return NA
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def fmt_ratio(x: float, digits: int = 2) -> str:
    """Targets use 3 digits, so that 0.947x (a FAIL of ≥ 0.95x) is not shown as 0.95x."""
    return NA if math.isnan(x) or math.isinf(x) else f"{x:.{digits}f}x"


def fmt_size(nbytes: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    return f"{nbytes} B"


def fmt_ops(per_second: float) -> str:
    return NA if math.isnan(per_second) else f"{per_second:,.0f}"


# --------------------------------------------------------------------------- the document


def targets_table(sections: Sequence[Section]) -> Table:
    table = Table(("section", "target", "measured", "result"))
    for s in sections:
        for t in s.targets:
            table.add(s.title, t.name, t.measured, t.verdict)
    return table


def render(header: Sequence[tuple[str, str]], sections: Sequence[Section], *, quick: bool) -> str:
    facts = Table(("", ""))
    for key, value in header:
        facts.add(key, value)
    parts = ["# memplug benchmark"]
    parts.append(
        "Written by `make bench` (`python -m bench`); every figure comes from "
        "the same run on the same machine. Times are medians of the repetitions after one "
        "discarded warm-up, each repetition starting from an empty range; ratios are speed "
        "ratios (memplug's speed ÷ the other's speed, so > 1 means memplug is faster)."
    )
    if quick:
        parts.append(
            "**QUICK RUN (`--quick`): smaller sizes and fewer repetitions, a smoke test. "
            "Its figures and verdicts are not the benchmark.**"
        )
    parts.append(facts.markdown())
    parts.append("## Targets")
    parts.append(targets_table(sections).markdown())
    parts += [s.markdown() for s in sections if s.tables or s.error or s.markdown_extra]
    return "\n\n".join(parts) + "\n"


def dump_json(
    path: Path,
    header: Sequence[tuple[str, str]],
    options: dict[str, Any],
    sections: Sequence[Section],
) -> None:
    document = {
        "header": dict(header),
        "options": options,
        "sections": {
            s.key: {
                "title": s.title,
                "error": s.error,
                "results": {r.key: r.to_json() for r in s.results},
                "targets": [
                    {"target": t.name, "measured": t.measured, "passed": t.passed}
                    for t in s.targets
                ],
            }
            for s in sections
        },
    }
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
