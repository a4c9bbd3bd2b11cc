"""Figures as people read them: bytes with units, ages as "3 min ago", fractions as percents."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(count: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None (not reported) -> ``"?"``."""
    if count is None:
        return "?"
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit always returns")


def ago(then: float | None, now: float) -> str:
    """A unix time as the time since it: ``"just now"``, ``"42 s ago"``, ``"3 min ago"``."""
    if then is None:
        return "never"
    return f"{duration(now - then)} ago" if now - then >= 1 else "just now"


def duration(seconds: float) -> str:
    """``75`` -> ``"1 min"``; whole units, the largest that fits."""
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
