"""Plain-text and Markdown tables: the one renderer behind every table zoo prints or writes.

Each column is as wide as its widest cell, columns are two spaces apart and trailing spaces
are cut, so ``zoo info``, ``zoo plan``, ``zoo compare`` and the reports all line up alike.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def table_lines(rows: Sequence[Sequence[str]], *, right: Collection[int] = (),
                rule: bool = False) -> list[str]:
    """``rows`` (the first one usually the header) as aligned lines: the columns numbered in
    ``right`` right-aligned, the others left-aligned; ``rule`` adds a line of dashes under
    the first row."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(row) for row in rows]
    if rule:
        lines.insert(1, line(["-" * w for w in widths]))
    return lines


def table(rows: Sequence[Sequence[str]], *, right: Collection[int] = (),
          rule: bool = False) -> str:
    """``table_lines`` joined into one string."""
    return "\n".join(table_lines(rows, right=right, rule=rule))


def markdown_table(rows: Sequence[Sequence[str]], *, right: Collection[int] = ()) -> str:
    """``rows`` (the first one the header) as a Markdown table; the columns numbered in
    ``right`` are right-aligned, and a ``|`` inside a cell is escaped."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join("---:" if i in right else "---" for i in range(len(rows[0]))) + "|"
    return "\n".join([line(rows[0]), align, *map(line, rows[1:])])
