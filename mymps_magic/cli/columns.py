"""The shell commands' aligned columns, read at a glance as ``ollama ps`` is read.

Sizes and times in the cells come from `mymps_magic._humanize`, as the panel's do, so that a model
reads the same in the terminal and in the notebook.
"""

from __future__ import annotations

from collections.abc import Sequence

GAP = "  "


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows (the first one usually a header) as lines whose columns start at the same place.

    Cells that hold spaces (``2 min ago``) stay readable because columns are two spaces apart; the
    last column is not padded, so no line ends in blanks.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(GAP.join(cells).rstrip())
    return lines
