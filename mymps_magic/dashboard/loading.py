"""A model load whose progress the page shows as it happens: the server's NDJSON progress lines,
passed on one by one as the dashboard's own NDJSON (``progress``, then ``done`` or ``error``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mymps_magic import wire
from mymps_magic._connection import Connection
from mymps_magic.dashboard.status import ErrorLog
from mymps_magic.errors import MympsError


def load_events(connection: Connection, log: ErrorLog, name: str, kind: str | None,
                dtype: str) -> Iterator[dict[str, Any]]:
    """Load ``name`` and yield the page's events: ``{"progress", "message"}`` while it loads,
    then ``{"done": message}`` or ``{"error": message}`` (also kept in ``log``).

    Iterating runs the load; stopping early (the page went away) closes the request, and the
    server drops the load.
    """
    try:
        body = wire.LoadRequest(name, kind or wire.DETECT, dtype).to_json()
        for line in connection.ndjson("POST", "/models/load", json_body=body):
            event = wire.read_progress_event(line)
            if event is not None:
                yield {"progress": event.progress, "message": event.message or event.stage}
            elif line.get("already_loaded"):
                yield {"done": f"{name} was already loaded"}
            else:
                what = f"{line.get('kind')}, {line.get('dtype')}"
                yield {"done": f"loaded {name} ({what}) in {line.get('load_time_s')} s"}
    except MympsError as exc:
        log.add(f"load {name}: {exc}")
        yield {"error": str(exc)}
