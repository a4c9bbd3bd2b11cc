"""What the shell commands print: aligned columns, sizes in binary units, times relative to now.

People read these at a glance, as they read ``ollama ps``: ``1.4 GiB`` and ``2 min ago``, never
raw byte counts or unix seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
GAP = "  "


def human_bytes(size: int | float) -> str:
    """``size`` bytes in the largest binary unit that keeps it at 1 or more: ``1.5 KiB``, ``15.6 GiB``.

    Whole bytes stay whole (``1023 B``); larger units get one decimal.
    """
    value = float(size)
    for unit in UNITS[:-1]:
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {UNITS[-1]}"


def relative_time(then: float, *, now: float | None = None) -> str:
    """Unix time ``then`` as its age: ``just now``, ``42 s ago``, ``2 min ago``, ``2 h ago``, ``3 days ago``.

    A time slightly ahead of ours (the server's clock runs a little fast) reads ``just now``.
    """
    age = (time.time() if now is None else now) - then
    if age < 5:
        return "just now"
    if age < 60:
        return f"{int(age)} s ago"
    if age < 3600:
        return f"{int(age // 60)} min ago"
    if age < 86400:
        return f"{int(age // 3600)} h ago"
    days = int(age // 86400)
    return f"{days} day{'' if days == 1 else 's'} ago"


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
