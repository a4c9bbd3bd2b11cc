"""Calls posted to the event loop from other threads, run in order and in bounded steps.

User code prints from the device worker (or threads it started) one line at a time. Posting
each line with ``loop.call_soon_threadsafe`` costs the writer a wake-up write per line and puts
thousands of callbacks in the loop's ready queue, which the loop runs in one iteration before it
looks at its sockets again: with a cell printing 40,000 lines, another client's ``/health``
waited 200 ms. Here the writers only append to a deque and wake the loop once; the loop runs at
most `STEP` calls, then lets its sockets be served before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

log = logging.getLogger("kernel_server.loopqueue")

STEP = 256
"""Calls run per loop iteration: a few milliseconds of work at most."""


class LoopQueue:
    """A FIFO of calls from any thread, run on ``loop``'s thread in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: collections.deque[Callable[[], object]] = collections.deque()
        self._scheduled = False

    def post(self, call: Callable[[], object]) -> None:
        """Queue ``call``; safe from any thread. Only the first call of a batch wakes the loop."""
        self._calls.append(call)
        if not self._scheduled:
            self._scheduled = True  # two threads may both schedule: a second run finds nothing
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        for _ in range(STEP):
            try:
                call = self._calls.popleft()
            except IndexError:
                self._scheduled = False
                # A call posted between the empty popleft and the line above saw the flag set
                # and did not schedule: look once more.
                if self._calls:
                    self._scheduled = True
                    self._loop.call_soon(self._run)
                return
            try:
                call()
            except Exception:  # one failing call must not strand the ones behind it
                log.exception("a call posted to the event loop failed")
        self._loop.call_soon(self._run)  # more to come: the sockets go first
