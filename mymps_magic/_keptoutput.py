"""Output kept to be shown later: `KeptOutput`, and `OutputFuture`, the future that keeps it.

A submitted call (`RemoteFuture`) shows its output as it comes, under the cell that submitted it,
and keeps it too; a ``--noblock`` cell (`CellFuture`) only keeps it. Either way
``display_outputs()`` shows it again under the cell that asks, as ipyparallel's
``AsyncResult.display_outputs`` does.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, TypeVar

from mymps_magic.display import OutputSink

T = TypeVar("T")

_WAIT_STEP_S = 0.2


class KeptOutput:
    """What a request printed and displayed, in order, kept until someone shows it (any number of
    times). Progress bars are not kept: they describe a moment that is over when shown later.

    Each item is ``("stdout" | "stderr", text)`` or ``("display", {"data": ..., "metadata": ...})``.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self._arrived = threading.Condition()

    def add(self, kind: str, content: Any) -> None:
        with self._arrived:
            self.items.append((kind, content))
            self._arrived.notify_all()

    def stream(self, name: str, text: str) -> None:
        self.add("stderr" if name == "stderr" else "stdout", text)

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        self.add("display", {"data": data, "metadata": metadata or {}})

    def merged(self) -> list[tuple[str, Any]]:
        """The items, with the pieces of one stream that follow each other joined."""
        merged: list[tuple[str, Any]] = []
        for kind, content in list(self.items):
            if merged and kind != "display" and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + content)
            else:
                merged.append((kind, content))
        return merged

    def show(self, sink: OutputSink, start: int = 0) -> int:
        """Show the items from ``start`` on through ``sink``; returns how many there are now."""
        items = self.items[start:]
        for kind, content in items:
            if kind == "display":
                sink.display(content["data"], content["metadata"])
            else:
                sink.stream(kind, content)
        return start + len(items)

    def wait_for_more(self, than: int, timeout: float) -> None:
        """Return when there are more than ``than`` items, or after ``timeout`` seconds."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.items) > than, timeout)


class OutputFuture(concurrent.futures.Future[T]):
    """A ``concurrent.futures.Future`` that keeps the output of the remote work it waits for.

    All of the work's output is kept before the future is done (its frames come before its end).
    """

    def __init__(self) -> None:
        super().__init__()
        self.kept = KeptOutput()

    @property
    def outputs(self) -> list[tuple[str, Any]]:
        """What arrived so far, in order: ``("stdout" | "stderr", text)`` and ``("display",
        {"data": mimebundle, "metadata": ...})`` items (progress bars are not kept)."""
        return self.kept.merged()

    def display_outputs(self, wait: bool = False) -> None:
        """Show the output that arrived so far here, under the cell that calls this.

        Args:
            wait: also show what arrives after, as it comes, until the work ends.
        """
        sink = OutputSink()
        shown = 0
        while True:
            done = self.done()  # read first: all output is kept before the future is done
            shown = self.kept.show(sink, shown)
            if done or not wait:
                return
            self.kept.wait_for_more(shown, _WAIT_STEP_S)
