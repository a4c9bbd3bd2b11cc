"""Numbers as a person reads them at a glance: sizes in binary units, times as "3 min ago".

The panel (and anything else that shows the server's state) formats through here, so that the
same byte count never reads as "1.5 GiB" in one place and "1536 MiB" in another.
"""

from __future__ import annotations

import time

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below one KiB; ``None`` (not reported) -> ``"?"``."""
    if n is None:
        return "?"
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable: the last unit takes any size")


def ago(t: float | None, now: float | None = None) -> str:
    """A unix time as "just now", "42 s ago", "3 min ago", "2 h ago" or "4 d ago"; "" for none."""
    if not t:
        return ""
    seconds = max(0.0, (time.time() if now is None else now) - t)
    if seconds < 1:
        return "just now"
    for limit, unit, scale in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{seconds // scale:.0f} {unit} ago"
    return f"{seconds // 86400:.0f} d ago"


def duration(seconds: float) -> str:
    """``75`` -> ``"1 min"``: whole units, the largest that fits (a job's age)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d"


def percent(fraction: float | None) -> str:
    """``0.25`` -> ``"25%"``; None (no progress reported) -> ``"-"``."""
    return "-" if fraction is None else f"{fraction * 100:.0f}%"
