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
* The outbox holds at most ``--session-buffer`` bytes (approximate: payload plus
  :data:`FRAME_OVERHEAD` per frame). Past it, output (stream, display and progress frames) is
  dropped and counted per request; the next frame of that request that is kept (its next output
  once there is room again, or at the latest its result) is preceded by one stderr line that
  says how much was dropped. Results and errors are always kept, even past the bound: losing
  one would leave a caller waiting for ever.
"""

from __future__ import annotations

import asyncio
import bisect

from mymps_magic import wire

OUTPUT = frozenset({"stream", "display", "progress"})
"""Frame types that may be dropped past the bound; every other frame ends or starts a request."""

FRAME_OVERHEAD = 400
"""Bytes a kept frame costs beyond its payload (the Frame, its fields dict, the text object)."""

BATCH_FRAMES = 2048
BATCH_BYTES = 1 << 20
"""Most frames and payload bytes a sender takes in one step (so one step stays short)."""

_COMPACT_AFTER = 4096


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
        return wire.Frame("stream", rid, {"name": "stderr", "text": text})


class Outbox:
    """The unacknowledged frames of one session, numbered and bounded.

    Kept in a list with a moving start (not a deque), so a socket's place in it is found by
    arithmetic on ``seq`` and acknowledging thousands of frames is one slice operation.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seq = 0  # the last number given
        self._frames: list[wire.Frame | None] = []
        self._before: list[int] = [0]  # _before[i]: bytes of the frames before index i, ever
        self._start = 0  # index of the first frame not acknowledged
        self._base = 1  # seq of index 0
        self._dropped: dict[int, _Dropped] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the kept frames are counted for."""
        return self._before[-1] - self._before[self._start]

    def __len__(self) -> int:
        return len(self._frames) - self._start

    def add(self, frame: wire.Frame) -> bool:
        """Number and keep ``frame``; False when it was output dropped past the bound."""
        size = frame_size(frame)
        dropped = self._dropped.get(frame.id)
        if frame.type in OUTPUT and self.nbytes + size > self.limit:
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
        self._before.append(self._before[-1] + size)

    def ack(self, seq: int) -> None:
        """Forget the frames up to ``seq``: the client has them."""
        end = min(max(seq - self._base + 1, self._start), len(self._frames))
        if end == self._start:
            return
        self._frames[self._start:end] = [None] * (end - self._start)
        self._start = end
        if self._start >= _COMPACT_AFTER and 2 * self._start >= len(self._frames):
            del self._frames[:self._start]
            del self._before[:self._start]
            self._base += self._start
            self._start = 0

    def after(self, seq: int) -> list[wire.Frame]:
        """The next batch of kept frames past ``seq`` (at most :data:`BATCH_FRAMES` frames and,
        unless the first alone is larger, :data:`BATCH_BYTES` bytes)."""
        first = max(seq - self._base + 1, self._start)
        end = min(first + BATCH_FRAMES, len(self._frames))
        if first >= end:
            return []
        budget = self._before[first] + BATCH_BYTES + FRAME_OVERHEAD * (end - first)
        end = max(first + 1, bisect.bisect_right(self._before, budget, first + 1, end + 1) - 1)
        return self._frames[first:end]  # type: ignore[return-value]  # past _start: never None


class Mailbox:
    """One socket's place in its session's outbox; the sender takes what lies past it."""

    def __init__(self, outbox: Outbox, sent: int) -> None:
        self.outbox = outbox
        self.sent = sent  # the last seq handed to this socket
        self.taken_over = False
        self._ready = asyncio.Event()
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    def take_over(self) -> None:
        """A newer connection has the session now: this socket's sender stops."""
        self.taken_over = True
        self._ready.set()

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
    return [run[0] if len(run) == 1 else wire.Frame(
        "stream", run[-1].id, {**run[-1].fields, "text": "".join(f.fields["text"] for f in run)}) for run in runs]
