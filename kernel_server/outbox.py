"""What a session keeps for its client: the frames it has not acknowledged, within a bound.

Every frame a session sends gets the next sequence number and stays in the :class:`Outbox`
until the client acknowledges it, so a client that reconnects is sent exactly what it missed.
A connected socket does not copy the outbox: its :class:`Mailbox` is a place in it (the last
``seq`` handed to the socket), so resuming a session with a large backlog costs nothing up front.

Two rules keep the event loop and the memory of the server safe from a client that does not
read (or a tunnel that is down while a cell prints):

* The sender takes bounded batches (:data:`BATCH_FRAMES`, :data:`BATCH_BYTES`) and merges the
  stream frames of each batch with one ``"".join``: linear in the backlog, a few milliseconds
  per step, and the loop is free between batches.
* The outbox holds about ``--session-buffer`` bytes (approximate: payload plus
  :data:`FRAME_OVERHEAD` per frame). What happens to output past it depends on the client:

  - A client that is connected and acknowledging (its acks advanced within
    :data:`ACK_WAIT_S`, or it attached that recently) is reading: the code that prints waits
    for room (see ``Session.emit_output``), as a program writing to a terminal waits for the
    terminal. The wait is in bounded steps on the writer's thread, never on the event loop, and
    stays interruptible (an interrupt's ``KeyboardInterrupt``, a cancel). So a reading client
    gets all output, however fast the cell prints.
  - A client that is away, or has not acknowledged for :data:`ACK_WAIT_S` while output waited,
    is not reading: output (stream, display and progress frames) is dropped and counted per
    request; the next frame of that request that is kept (its next output once there is room
    again, or at the latest its result) is preceded by one stderr line that says how much was
    dropped. The next ack (or a new connection) makes the client a reader again.

  Results and errors are always kept, even past the bound: losing one would leave a caller
  waiting for ever. A single output frame larger than the whole bound is dropped at once.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from mymps_magic import wire

FRAME_OVERHEAD = 400
"""Bytes a kept frame costs beyond its payload (the Frame, its fields dict, the text object)."""

BATCH_FRAMES = 2048
BATCH_BYTES = 1 << 20
"""Most frames and payload bytes a sender takes in one step (so one step stays short)."""

ACK_WAIT_S = 5.0
"""How long output waits for room without the client's acks advancing before the client is
taken as not reading (and its output dropped): long enough for a busy notebook to catch up."""

WAIT_STEP_S = 0.1
"""Longest a writer waiting for room sleeps before it checks for a cancel again."""

_COMPACT_AFTER = 4096

log = logging.getLogger("kernel_server.sessions")


class TakenOver(Exception):
    """This socket's session was taken over by a newer connection."""


def frame_size(frame: wire.Frame) -> int:
    """The memory a kept frame is counted for: its payload plus :data:`FRAME_OVERHEAD`."""
    size = FRAME_OVERHEAD + sum(memoryview(b).nbytes for b in frame.buffers)
    if frame.type == "stream":
        size += len(frame.fields["text"])
    elif frame.type == "display":
        size += sum(len(v) for v in frame.fields.get("data", {}).values() if isinstance(v, (str, bytes)))
    return size


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _Dropped:
    """What was dropped of one request's output, until the client is told."""

    __slots__ = ("lines", "nbytes", "others")

    def __init__(self) -> None:
        self.lines = self.nbytes = self.others = 0

    def count(self, frame: wire.Frame, size: int) -> None:
        self.nbytes += size - FRAME_OVERHEAD
        if frame.type == "stream":
            self.lines += max(1, frame.fields["text"].count("\n"))
        else:
            self.others += 1

    def notice(self, rid: int) -> wire.Frame:
        what = f"{self.lines:,} lines"
        if self.others:
            what += f" and {self.others:,} displays or progress updates"
        text = f"[mymps: {what} ({_human(self.nbytes)}) of output dropped: the client was not reading]\n"
        return wire.stream(rid, "stderr", text)


class Outbox:
    """The unacknowledged frames of one session, numbered and bounded.

    Kept in a list with a moving start (not a deque), so a socket's place in it is found by
    arithmetic on ``seq`` and acknowledging thousands of frames is one slice operation.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seq = 0  # the last number given
        self._frames: list[wire.Frame | None] = []
        self._before: list[int] = [0]  # _before[i]: payload bytes of the frames before index i, ever
        self._start = 0  # index of the first frame not acknowledged
        self._base = 1  # seq of index 0
        self._dropped: dict[int, _Dropped] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the kept frames are counted for."""
        return self._before[-1] - self._before[self._start] + FRAME_OVERHEAD * (len(self._frames) - self._start)

    def add(self, frame: wire.Frame) -> bool:
        """Number and keep ``frame``; False when it was output dropped past the bound."""
        size = frame_size(frame)
        dropped = self._dropped.get(frame.id)
        if frame.type in wire.OUTPUT_FRAMES and self.nbytes + size > self.limit:
            if dropped is None:
                dropped = self._dropped[frame.id] = _Dropped()
            dropped.count(frame, size)
            return False
        if dropped is not None:  # the client learns what it missed where it would have been
            del self._dropped[frame.id]
            notice = dropped.notice(frame.id)
            self._keep(notice, frame_size(notice))
        self._keep(frame, size)
        return True

    def _keep(self, frame: wire.Frame, size: int) -> None:
        self.seq += 1
        frame.fields["seq"] = self.seq
        self._frames.append(frame)
        self._before.append(self._before[-1] + size - FRAME_OVERHEAD)

    def ack(self, seq: int) -> bool:
        """Forget the frames up to ``seq``: the client has them. True if that freed any."""
        end = min(max(seq - self._base + 1, self._start), len(self._frames))
        if end == self._start:
            return False
        self._frames[self._start:end] = [None] * (end - self._start)
        self._start = end
        if self._start >= _COMPACT_AFTER and 2 * self._start >= len(self._frames):
            del self._frames[:self._start]
            del self._before[:self._start]
            self._base += self._start
            self._start = 0
        return True

    def after(self, seq: int) -> list[wire.Frame]:
        """The next batch of kept frames past ``seq`` (at most :data:`BATCH_FRAMES` frames and,
        unless the first alone is larger, :data:`BATCH_BYTES` bytes)."""
        first = max(seq - self._base + 1, self._start)
        end = min(first + BATCH_FRAMES, len(self._frames))
        if first >= end:
            return []
        budget = self._before[first] + BATCH_BYTES
        end = max(first + 1, bisect.bisect_right(self._before, budget, first + 1, end + 1) - 1)
        return self._frames[first:end]  # type: ignore[return-value]  # past _start: never None


class Room:
    """Flow control of a session's output: writers wait here for room in its outbox.

    Writers are the threads user code prints from; ``held``, ``arrived`` and ``client_reads``
    come from the event loop, the one thread that touches the outbox (a writer reading the
    outbox's lists while the loop compacts them could see them half-changed). ``posted`` counts
    output handed to the loop but not in the outbox yet, so a fast writer cannot overrun the
    bound between two turns of the loop.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # the outbox's nbytes, as the loop last set it (one int: read whole)
        self._cond = threading.Condition()
        self._posted = 0
        self._acked_at = time.monotonic()  # the last ack that freed frames, or the last attach
        self._stalled = False  # the client stopped acknowledging while output waited

    def wait(self, frame: wire.Frame, attached: Callable[[], bool], check_cancelled: Callable[[], None],
             sid: str) -> int:
        """Wait until ``frame`` fits, while the client is attached and acknowledging (see the
        module's docstring); returns its size, counted as posted until :meth:`arrived`.

        Raises:
            whatever ``check_cancelled`` raises, checked every :data:`WAIT_STEP_S`.
        """
        size = frame_size(frame)
        with self._cond:
            started = time.monotonic()
            while attached() and self._full(size):
                if time.monotonic() - max(started, self._acked_at) > ACK_WAIT_S:
                    self._stalled = True
                    log.info("session %s: no ack for %g s while output waited; its output is dropped until the "
                             "client acknowledges again", sid[:8], ACK_WAIT_S)
                    break
                check_cancelled()
                self._cond.wait(WAIT_STEP_S)
            self._posted += size
        return size

    def _full(self, size: int) -> bool:
        held = self.held + self._posted
        return not self._stalled and held > 0 and held + size > self.limit

    def arrived(self, size: int) -> None:
        """A posted frame reached the outbox (kept or dropped)."""
        with self._cond:
            self._posted -= size

    def client_reads(self) -> None:
        """An ack freed frames, or a socket attached: waiting output may go on."""
        with self._cond:
            self._acked_at = time.monotonic()
            self._stalled = False
            self._cond.notify_all()

    def wake(self) -> None:
        """Something a writer waits on changed (its client went away)."""
        with self._cond:
            self._cond.notify_all()


class Mailbox:
    """One socket's place in its session's outbox; the sender takes what lies past it."""

    def __init__(self, outbox: Outbox, sent: int) -> None:
        self.outbox = outbox
        self.sent = sent  # the last seq handed to this socket
        self.taken_over = False
        self._ready = asyncio.Event()
        self._ready.set()
        self._over = asyncio.Event()

    def wake(self) -> None:
        self._ready.set()

    def take_over(self) -> None:
        """A newer connection has the session now: this socket's sender stops."""
        self.taken_over = True
        self._ready.set()
        self._over.set()

    async def until_taken_over(self) -> None:
        """Return once a newer connection has taken the session: the socket must then be told
        at once, even while its sender waits for a slow reader to make room."""
        await self._over.wait()

    async def take(self) -> list[wire.Frame]:
        """The next batch to send, its stream frames merged; waits until there is one.

        Raises:
            TakenOver: a newer connection took the session.
        """
        while True:
            if self.taken_over:
                raise TakenOver
            batch = self.outbox.after(self.sent)
            if batch:
                self.sent = batch[-1].fields["seq"]
                return merge_streams(batch)
            self._ready.clear()
            await self._ready.wait()


def _joins(prev: wire.Frame, frame: wire.Frame) -> bool:
    return (frame.type == prev.type == "stream" and frame.id == prev.id
            and frame.fields["name"] == prev.fields["name"])


def merge_streams(frames: list[wire.Frame]) -> list[wire.Frame]:
    """Join neighbouring stream frames of one request and stream (a loop of prints becomes a
    few frames), in linear time. A merged frame carries the last one's ``seq``; the outbox
    keeps the originals."""
    runs: list[list[wire.Frame]] = []
    for frame in frames:
        if runs and _joins(runs[-1][-1], frame):
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return [run[0] if len(run) == 1 else dataclasses.replace(
        run[-1], fields={**run[-1].fields, "text": "".join(f.fields["text"] for f in run)}) for run in runs]
