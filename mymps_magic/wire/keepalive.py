"""``keep_alive``: how long a model stays loaded once nothing uses it, as Ollama users write it.

A number of seconds (``300``, ``2.5``), ``-1`` (or any negative number) for forever, ``0`` to
unload as soon as the request using it ends, or a duration string in Go's spelling as Ollama
takes it: ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"``, ``"500ms"``, ``"-1"``. Load and generation
requests carry it (``LoadRequest.keep_alive``, ``GenerateRequest.keep_alive``) and the server's
``--keep-alive`` reads it with the same :func:`parse_keep_alive`, so both ends agree on the
spellings.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from .errors import WireFormatError

FOREVER: Final = -1.0
"""The seconds of a model that never expires."""

KeepAlive = float | int | str
"""What a request may carry: seconds or a duration string."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:ms|s|m|h))+)$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
SPELLINGS: Final = "seconds (300), -1 for forever, 0 to unload when idle, or a duration like 30s, 5m, 1h30m"


def parse_keep_alive(value: Any) -> float:
    """Seconds to keep a model loaded once idle; :data:`FOREVER` (-1) for any negative value.

    Raises:
        WireFormatError: ``value`` is neither a finite number nor a duration string; the
            message lists the spellings.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WireFormatError(f"keep_alive must be {SPELLINGS}, not {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if _NUMBER.match(text):
            seconds = float(text)
        elif match := _DURATION.match(text):
            sign, parts = match.groups()
            seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(parts))
            seconds = -seconds if sign else seconds
        else:
            raise WireFormatError(f"keep_alive must be {SPELLINGS}, not {value!r}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise WireFormatError(f"keep_alive must be {SPELLINGS}, not {value!r}")
    return FOREVER if seconds < 0 else seconds


def describe_keep_alive(seconds: float) -> str:
    """``-1`` -> ``"forever"``, ``300`` -> ``"5m"``, ``90`` -> ``"1m30s"``: for log lines and messages."""
    if seconds < 0:
        return "forever"
    whole = round(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
