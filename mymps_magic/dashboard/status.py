"""One refresh of what the page shows: four calls to the server, made only when a page asks.

The view holds display-ready strings (units, relative times), so the template only lays them out.
A server that cannot be reached gives a "disconnected" view with the reason, never an exception.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from mymps_magic import _humanize as humanize
from mymps_magic.client import Client
from mymps_magic.errors import MympsError

MAX_ERRORS = 8


class ErrorLog:
    """The last errors the dashboard met, newest first; a repeat updates its time instead of
    filling the list (a server that is down fails every refresh with the same message)."""

    def __init__(self, size: int = MAX_ERRORS) -> None:
        self._entries: collections.deque[tuple[float, str]] = collections.deque(maxlen=size)

    def add(self, message: str) -> None:
        if self._entries and self._entries[0][1] == message:
            self._entries.popleft()
        self._entries.appendleft((time.time(), message))

    def entries(self, now: float) -> list[tuple[str, str]]:
        """``(age, message)`` pairs, newest first."""
        return [(humanize.ago(then, now), message) for then, message in self._entries]


@dataclass(frozen=True)
class Memory:
    """The device's memory, as the bar shows it."""

    allocated: str
    total: str
    driver: str
    percent: float


@dataclass(frozen=True)
class StatusView:
    """What one refresh found; ``reason`` is set when the server could not be reached."""

    address: str
    connected: bool
    reason: str = ""
    latency_ms: float = 0.0
    version: str = ""
    device: str = ""
    device_name: str = ""
    memory: Memory | None = None
    models: list[dict[str, str]] = field(default_factory=list)
    jobs: list[dict[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def collect(client: Client, log: ErrorLog) -> StatusView:
    """Ask the server for its health, memory, models and jobs, and shape them for the page.

    Args:
        client: the dashboard's client (it holds the token).
        log: where a failure is recorded, and whose entries the view shows.

    Returns:
        The view; a failure shows as ``connected=False`` with the reason.
    """
    address = client.settings.address
    started = time.perf_counter()
    try:
        health = client.health()
        latency_ms = (time.perf_counter() - started) * 1000
        stats, models, jobs = client.stats(), client.models(), client.jobs()
    except MympsError as exc:
        log.add(str(exc))
        return StatusView(address, False, reason=str(exc), errors=log.entries(time.time()))
    now = time.time()
    return StatusView(
        address,
        True,
        latency_ms=latency_ms,
        version=str(health.get("version", "?")),
        device=str(health.get("device", "?")),
        device_name=str(health.get("device_name", "")),
        memory=_memory(stats.get("device", {})),
        models=[_model(model, now) for model in models],
        jobs=[_job(job, now) for job in jobs],
        errors=log.entries(now),
    )


def _memory(device: dict[str, Any]) -> Memory:
    allocated, total = device.get("allocated"), device.get("total")
    share = 100 * allocated / total if allocated is not None and total else 0.0
    return Memory(humanize.size(allocated), humanize.size(total), humanize.size(device.get("driver")),
                  min(100.0, share))


def _model(model: dict[str, Any], now: float) -> dict[str, str]:
    return {
        "name": str(model["name"]),
        "kind": str(model.get("kind", "?")),
        "dtype": str(model.get("dtype", "?")),
        "size": humanize.size(model.get("bytes")),
        "loaded": humanize.ago(model.get("loaded_at"), now),
        "used": humanize.ago(model.get("last_used"), now),
    }


def _job(job: dict[str, Any], now: float) -> dict[str, str]:
    return {
        "id": str(job["id"]),
        "kind": str(job.get("kind", "?")),
        "state": str(job.get("state", "?")),
        "session": str(job.get("session") or "-"),
        "model": str(job.get("model") or "-"),
        "progress": humanize.percent(job.get("progress")),
        "age": humanize.duration(now - job["submitted"]) if job.get("submitted") else "?",
    }
