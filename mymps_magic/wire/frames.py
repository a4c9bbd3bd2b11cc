"""Session frames as WebSocket messages (and as an upload's byte stream), both ways.

A frame is one WebSocket binary message: a 4-byte big-endian header length, a msgpack header,
then the frame's buffers back to back. The header always has ``v`` (protocol version), ``t``
(type) and ``id`` (the request it belongs to; 0 for none), and ``bufs`` (the buffer sizes). A
frame whose buffers exceed ``CHUNK`` bytes is sent as its header message (``chunked: true``, no
data) followed by the buffers' bytes in messages of at most ``CHUNK`` bytes, which the receiver
copies into buffers it allocated once from the sizes; so a 256 MiB array is never held twice.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import FrameTooLarge, WireFormatError

PROTOCOL_VERSION = 1

CHUNK = 4 * 1024 * 1024
"""Largest WebSocket message a frame's data is cut into (well under uvicorn's 16 MiB default)."""

MAX_BUFFERS = 65536
"""Most buffers one frame may list: a push of a dict of thousands of arrays fits, while a small
header cannot make the receiver allocate millions of (empty) buffers."""

CLOSE_TAKEN_OVER = 4001
"""Close code of a session socket whose session a newer connection took over; a client that
gets it must not reconnect (it would take the session back), and shows the reason."""

TAKEN_OVER_REASON = "the session was taken over by another connection"
"""The reason sent with :data:`CLOSE_TAKEN_OVER`."""

CLOSE_PROTOCOL_MISUSE = 4002
"""Close code for a client that broke the protocol (no complete hello in time, a second request
on a ``/ws/generate`` socket); its reason says what to do. 1008 is kept for a refused token."""

HELLO_TIMEOUT_S = 10.0
"""A session's hello must arrive within this of the connection, or the socket is closed."""

OUTPUT_FRAMES = frozenset({"stream", "display", "progress"})
"""Session frame types that carry a request's output, not its start or end; the server may drop
them past ``--session-buffer``, and a client shows them as they come."""

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

_HEADER_LEN = struct.Struct(">I")


@dataclass
class Frame:
    """One message of the session channel: a header and its buffers."""

    type: str
    id: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    buffers: list[Any] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cloudpickle_version() -> str:
    import cloudpickle

    return str(cloudpickle.__version__)


def encode_frame(frame: Frame) -> list[bytes | memoryview]:
    """The WebSocket messages that carry ``frame``, without copying large buffers."""
    views = _views(frame.buffers)
    if sum(v.nbytes for v in views) <= CHUNK:
        packed = _header(frame, views, chunked=False)
        return [b"".join([_HEADER_LEN.pack(len(packed)), packed, *views])]
    messages = encode_stream(frame)[:1]
    for view in views:
        for start in range(0, view.nbytes, CHUNK):
            messages.append(view[start:start + CHUNK])
    return messages


def encode_stream(frame: Frame) -> list[bytes | memoryview]:
    """``frame`` as one byte stream (an upload's HTTP body): the header of a chunked frame,
    then the buffers back to back, uncopied. :meth:`FrameDecoder.feed_stream` reads it."""
    views = _views(frame.buffers)
    packed = _header(frame, views, chunked=True)
    return [_HEADER_LEN.pack(len(packed)) + packed, *views]


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    return [memoryview(b).cast("B") if not isinstance(b, memoryview) else b.cast("B") for b in buffers]


def _header(frame: Frame, views: list[memoryview], *, chunked: bool) -> bytes:
    header = {**frame.fields, "v": PROTOCOL_VERSION, "t": frame.type, "id": frame.id, "bufs": [v.nbytes for v in views]}
    if chunked:
        header["chunked"] = True
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return packed


class FrameDecoder:
    """Turns WebSocket messages back into frames; feed messages in the order they arrived."""

    def __init__(self, max_size: int | None = None) -> None:
        """``max_size`` bounds a frame's buffers, checked before anything is allocated for them."""
        self.max_size = max_size
        self._pending: Frame | None = None
        self._sizes: list[int] = []
        self._index = 0
        self._offset = 0
        self._head: bytearray | None = bytearray()  # a stream's header bytes, until complete

    def feed(self, message: bytes | bytearray | memoryview) -> Frame | None:
        """Return the frame this message completes, or None while a chunked frame is incomplete.

        Raises:
            WireFormatError: the message is not a frame of this protocol version.
        """
        if self._pending is not None:
            return self._feed_chunk(memoryview(message))
        view = memoryview(message)
        if view.nbytes < _HEADER_LEN.size:
            raise WireFormatError("a session frame must start with a 4-byte header length")
        (length,) = _HEADER_LEN.unpack_from(view)
        try:
            header = msgpack.unpackb(view[4:4 + length], raw=False)
        except Exception as exc:
            raise WireFormatError(f"the frame header is not valid msgpack ({exc})") from None
        if not isinstance(header, dict) or "t" not in header:
            raise WireFormatError("the frame header must be a map with a type 't'")
        if header.get("v") != PROTOCOL_VERSION:
            raise WireFormatError(
                f"protocol version {header.get('v')} on the other end, {PROTOCOL_VERSION} here: "
                "install the same mymps version on both machines"
            )
        bufs = header.pop("bufs", [])
        if not isinstance(bufs, list):
            raise WireFormatError("the frame header's 'bufs' must be a list of buffer sizes")
        if len(bufs) > MAX_BUFFERS:
            raise WireFormatError(f"a frame lists {len(bufs):,} buffers, over the limit of {MAX_BUFFERS:,}; "
                                  "send fewer, larger values (e.g. stack the arrays)")
        frame_id = header.pop("id", 0)
        # Integers only: int() would take 1.5 as 1 and "7" as 7, and the answer would then carry
        # an id its sender never used.
        if not all(_is_int(n) for n in [frame_id, *bufs]):
            raise WireFormatError(f"the frame header's id and buffer sizes must be integers, not {frame_id!r} "
                                  f"and {bufs[:8]!r}")
        sizes = list(bufs)
        frame = Frame(str(header.pop("t")), frame_id, header)
        if any(n < 0 for n in sizes):
            raise WireFormatError("a buffer size in the frame header is negative")
        if self.max_size is not None and sum(sizes) > self.max_size:
            raise FrameTooLarge(f"a frame of {sum(sizes)} bytes is over the limit of {self.max_size} bytes "
                                "(--max-body)")
        header.pop("v", None)
        if header.pop("chunked", False):
            # np.empty, not bytearray(n): zero-filling 256 MiB would cost ~100 ms for nothing.
            frame.buffers = [np.empty(n, dtype=np.uint8) for n in sizes]
            self._pending, self._sizes, self._index, self._offset = frame, sizes, 0, 0
            return self._skip_empty()
        offset = 4 + length
        for i, n in enumerate(sizes):
            # Buffers after the first hold array memory: copied into writable memory, or every
            # array a user pulls would be read-only (the first, the pickle stream, is only read).
            part = view[offset:offset + n]
            frame.buffers.append(part if i == 0 else bytearray(part))
            offset += n
        if offset != view.nbytes:
            raise WireFormatError("the frame's buffers do not match the sizes in its header")
        return frame

    def chunk_target(self, n: int) -> memoryview | None:
        """Where the next ``n``-byte message of a chunked frame belongs, so the transport can
        read it straight there (then call :meth:`chunk_filled`); None when no chunked frame is
        waiting for data or the message would not fit."""
        if self._pending is None or self._offset + n > self._sizes[self._index]:
            return None
        return memoryview(self._pending.buffers[self._index])[self._offset:self._offset + n]

    def chunk_filled(self, n: int) -> Frame | None:
        """Count ``n`` bytes written in place at :meth:`chunk_target`; returns the frame they
        complete, or None."""
        self._offset += n
        return self._skip_empty()

    def feed_stream(self, data: bytes | bytearray | memoryview) -> Frame | None:
        """Take the next bytes of a stream written by :func:`encode_stream`, split anywhere;
        returns the frame once its last byte arrived.

        Raises:
            WireFormatError: the stream is not such a frame, or runs past its buffers.
        """
        view = memoryview(data).cast("B")
        if self._pending is None and self._head is not None:
            self._head += view
            if len(self._head) < _HEADER_LEN.size:
                return None
            end = _HEADER_LEN.size + _HEADER_LEN.unpack_from(self._head)[0]
            if len(self._head) < end:
                return None
            head, rest = bytes(self._head[:end]), bytes(self._head[end:])
            self._head = None
            frame = self.feed(head)  # a header without "chunked" and with data is refused here
            if frame is not None:  # no bytes to come
                if rest:
                    raise WireFormatError("the stream runs past the end of the frame's buffers")
                return frame
            view = memoryview(rest)
        frame = None
        while view.nbytes:
            if self._pending is None:
                raise WireFormatError("the stream runs past the end of the frame's buffers")
            n = min(view.nbytes, self._sizes[self._index] - self._offset)
            target = self.chunk_target(n)
            assert target is not None
            target[:] = view[:n]
            frame = self.chunk_filled(n)
            view = view[n:]
        return frame

    def _skip_empty(self) -> Frame | None:
        while self._pending is not None and self._index < len(self._sizes) and self._offset == self._sizes[self._index]:
            self._index += 1
            self._offset = 0
        if self._pending is not None and self._index == len(self._sizes):
            frame, self._pending = self._pending, None
            return frame
        return None

    def _feed_chunk(self, view: memoryview) -> Frame | None:
        assert self._pending is not None
        target = self._pending.buffers[self._index]
        end = self._offset + view.nbytes
        if end > self._sizes[self._index]:
            raise WireFormatError("a chunk runs past the end of its buffer")
        memoryview(target)[self._offset:end] = view
        self._offset = end
        return self._skip_empty()
