"""The wire format: the one module both the client and the server import.

Everything that crosses the connection is built and read here, so the two ends cannot drift
apart. This module must stay importable without torch: the client never has it.

Formats defined here:

* ``/infer`` bodies, kept compatible with the original mymps ``tensor.py``: a msgpack map of
  ``name -> {"shape": [..], "dtype": "float32", "data": <raw array bytes>}``.
* ``/models/load`` progress: NDJSON lines ``{"event": "progress", "stage", "progress", "message"}``
  ending with the same object the plain request answers (``{"status": "ok", ...}``) or an error
  line ``{"error": "..."}``.
* Errors: JSON ``{"error": "..."}`` with a fitting HTTP status.
* ``/ws/session`` frames (SPEC 4), below.

The session channel
-------------------
A frame is one WebSocket binary message: a 4-byte big-endian header length, a msgpack header,
then the frame's buffers back to back. The header always has ``v`` (protocol version), ``t``
(type) and ``id`` (the request it belongs to; 0 for none), and ``bufs`` (the buffer sizes). A
frame whose buffers exceed ``CHUNK`` bytes is sent as its header message (``chunked: true``, no
data) followed by the buffers' bytes in messages of at most ``CHUNK`` bytes, which the receiver
copies into buffers it allocated once from the sizes; so a 256 MiB array is never held twice.

Values travel as cloudpickle protocol 5 with out-of-band buffers: buffer 0 is the pickle
stream, the rest are the raw memory of numpy arrays and tensors. Torch tensors are reduced
through numpy (their own reducer would copy the storage in-band) and come back as torch tensors
where torch is importable, else as numpy arrays.

Client -> server (``id`` is the client's request number, increasing within a session; every
request carries ``ack``, the last server frame the client has, so the server can forget it):

=============  ==========================================================================
``hello``      first frame: ``session`` (id to resume, or None), ``last_seq`` (last server
               frame seen), ``python`` ("3.11"), ``cloudpickle`` (version), ``protocol``
``run``        ``fn``: the function's own pickle stream, buffers: pickled ``(args, kwargs)``;
               or, without ``fn`` (a function whose pickle has out-of-band buffers), buffers:
               pickled ``(fn, args, kwargs)``. The value comes back in ``result``
``cell``       ``source``: Python source run in the namespace; ``result`` carries the value of
               the last expression (pickled, when it pickles) and its ``mime`` bundle
``push``       buffers: a pickled ``dict`` merged into the namespace
``pull``       ``names``: list of names; ``result`` carries a pickled tuple of values
``interrupt``  raise ``KeyboardInterrupt`` in this session's running code (``target`` request
               id, or 0 for whatever of this session runs)
``cancel``     ``target``: drop that queued request; ``result`` ``{cancelled: bool}``
``reset``      clear the namespace (the models stay loaded)
``ack``        ``seq``: as a request's ``ack``, when many frames arrived without a request
=============  ==========================================================================

Any request may carry ``upload`` instead of buffers: the id ``PUT /session/{id}/upload``
answered for a body written by :func:`encode_stream`. The client does this when a request's
buffers pass ``CHUNK``: an HTTP body is read straight into the buffers it fills, where
WebSocket messages from a client are masked and then copied several times on the way.

Server -> client (each has ``seq``, increasing within a session, so a client that reconnects
gets exactly what it missed):

=============  ==========================================================================
``welcome``    ``session``, ``resumed`` (bool), ``python``, ``cloudpickle``, ``server``
               (version), ``last_request`` (highest request id the server has received, so
               the client resends only what never arrived), ``mismatch`` (a line or None),
               ``session_buffer`` (bytes the server keeps unacknowledged: the client acks
               at least every quarter of it)
``started``    the request left the queue and runs now; ``job`` is its id in ``/jobs``
               (sent only for requests that asked with ``notify_start``: futures)
``stream``     ``name`` ("stdout"/"stderr"), ``text``
``display``    ``data`` (mimebundle: mime -> str or bytes), ``metadata``
``progress``   ``bar`` (id), ``n``, ``total``, ``desc``, ``unit``, ``elapsed``, ``closed``
``result``     the request's outcome; buffers: the pickled value where there is one;
               ``mime``: rich repr of a cell's last value; ``fields`` for small plain answers
``error``      ``ename``, ``evalue``, ``traceback`` (lines, server frames trimmed), and
               ``code``: "remote" (the user's code raised), "pickle", "name", "version",
               "cancelled", "session", "bad_request"
=============  ==========================================================================

Limits: a frame lists at most ``MAX_BUFFERS`` buffers; the hello must arrive within
``HELLO_TIMEOUT_S`` of the connection (else the socket is closed with ``CLOSE_PROTOCOL_MISUSE``);
request ids run from 1 to 2**63-1 and must increase (a bad one gets an ``error`` naming it). A
newer connection to the same session takes it over: the older socket is closed with
``CLOSE_TAKEN_OVER`` and a reason. Past ``--session-buffer`` of unacknowledged frames, the code
printing waits while a connected client acknowledges as it reads; for a client that is away or
has stopped acknowledging, output frames are dropped and one ``stream`` line (stderr) says how
much, before the request's next frame; ``result`` and ``error`` frames are never dropped.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

HEADER_MODEL = "x-model"
MSGPACK = "application/msgpack"
NDJSON = "application/x-ndjson"

# Message types of /ws/generate (the original's names).
MSG_TOKEN = "token"
MSG_DONE = "done"
MSG_ERROR = "error"
# Client -> server on /ws/generate: stop now, then answer with the `done` frame
# (``stop_reason: "cancelled"``) and close, once the job is off /jobs.
MSG_CANCEL = "cancel"

# Event type of a /models/load progress line.
EVENT_PROGRESS = "progress"


class WireFormatError(ValueError):
    """A payload does not follow the wire format; the message says which part is wrong."""


class FrameTooLarge(WireFormatError):
    """A session frame declares more bytes than the receiver accepts."""


def pack_tensors(tensors: Mapping[str, Any]) -> bytes:
    """Pack ``name -> array`` as the original's msgpack tensor map.

    Args:
        tensors: numpy arrays (or anything ``np.asarray`` accepts, e.g. lists).

    Returns:
        The msgpack bytes of ``{name: {"shape", "dtype", "data"}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        arr = np.ascontiguousarray(np.asarray(value))
        out[str(name)] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "data": arr.tobytes()}
    return msgpack.packb(out, use_bin_type=True)


def unpack_tensors(body: bytes) -> dict[str, np.ndarray]:
    """Read a msgpack tensor map back into numpy arrays.

    Raises:
        WireFormatError: the body is not msgpack, not a map of tensors, or a tensor's byte
            count does not match its shape and dtype.
    """
    try:
        raw = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireFormatError(f"body is not valid msgpack ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise WireFormatError("body must be a non-empty msgpack map of name -> {shape, dtype, data}")
    arrays: dict[str, np.ndarray] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not {"shape", "dtype", "data"} <= spec.keys():
            raise WireFormatError(f"tensor {name!r} must be a map with keys shape, dtype and data")
        try:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(d) for d in spec["shape"])
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"tensor {name!r}: bad shape or dtype ({exc})") from None
        data = spec["data"]
        if not isinstance(data, (bytes, bytearray)):
            raise WireFormatError(f"tensor {name!r}: data must be raw bytes")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(data) != expected:
            raise WireFormatError(
                f"tensor {name!r}: {len(data)} bytes of data, but shape {list(shape)} of {dtype} needs {expected}"
            )
        arrays[str(name)] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arrays


def progress_event(stage: str, progress: float, message: str = "") -> dict[str, Any]:
    """One ``/models/load`` progress event; ``progress`` runs from 0.0 to 1.0."""
    return {"event": EVENT_PROGRESS, "stage": stage, "progress": round(float(progress), 4), "message": message}


def ndjson_line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


ERROR_CONFLICT = "conflict"
"""``code`` of a 409 that is not a cancellation: the name is loaded as another kind or dtype."""


def error_body(message: str, status: int | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of every error answer; ``status`` is added where no HTTP status carries it
    (an NDJSON line, a WebSocket frame), ``code`` where the status alone is ambiguous (409)."""
    body: dict[str, Any] = {"error": message}
    if status is not None:
        body["status"] = status
    if code is not None:
        body["code"] = code
    return body


# --------------------------------------------------------------------------------------------
# The session channel

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
    return msgpack.packb(header, use_bin_type=True)


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
        try:
            sizes = [int(n) for n in bufs]
            frame = Frame(str(header.pop("t")), int(header.pop("id", 0)), header)
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"the frame header has a bad id or buffer size ({exc})") from None
        if any(n < 0 for n in sizes):
            raise WireFormatError("a buffer size in the frame header is negative")
        if self.max_size is not None and sum(sizes) > self.max_size:
            raise FrameTooLarge(f"a frame of {sum(sizes)} bytes is over the limit of {self.max_size} bytes (--max-body)")
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


# Pickling ------------------------------------------------------------------------------------

def _rebuild_tensor(array: np.ndarray, dtype: str) -> Any:
    """Unpickle a tensor: a torch tensor where torch is importable, else the numpy array."""
    try:
        import torch
    except ImportError:
        return array.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32) if dtype == "bfloat16" else array
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _tensor_reduce(tensor: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return _rebuild_tensor, (t.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16")
    return _rebuild_tensor, (t.contiguous().numpy(), str(t.dtype).removeprefix("torch."))


_PICKLERS: dict[bool, type] = {}


def _pickler() -> type:
    """cloudpickle's Pickler, plus tensors through numpy once torch is imported.

    A dispatch table, not a ``reducer_override``: that would be a Python call for every object
    pickled (a third of the time of a small call). The C pickler reads the table when an instance
    is made, so it is a class attribute of a subclass made once.
    """
    import collections

    import cloudpickle

    torch = sys.modules.get("torch")
    cls = _PICKLERS.get(torch is not None)
    if cls is None:
        table: Any = cloudpickle.Pickler.dispatch_table
        if torch is not None:
            table = collections.ChainMap({torch.Tensor: _tensor_reduce, torch.nn.Parameter: _tensor_reduce}, table)
        cls = _PICKLERS[torch is not None] = type("Pickler", (cloudpickle.Pickler,), {"dispatch_table": table})
    return cls


@functools.lru_cache(maxsize=512)
def global_names(code: Any) -> frozenset[str]:
    """The global names a code object (and the functions and classes defined in it) may look
    up: what a function sent by value can need from the namespace it lands in. Kept per code
    object (code objects compare by value, so a function sent again shares the entry)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= global_names(const)
    return frozenset(names)


_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})


def _plain(value: Any, depth: int = 2) -> bool:
    """Small plain data (None, numbers, strings, and short tuples, lists and dicts of them),
    which the C pickler writes exactly as cloudpickle would, in a tenth of the time."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if not depth or kind not in (tuple, list, dict) or len(value) > 16:
        return False
    if kind is dict:
        return all(type(k) is str and _plain(v, depth - 1) for k, v in value.items())
    return all(_plain(item, depth - 1) for item in value)


def dumps(value: Any) -> list[Any]:
    """Pickle ``value`` into buffers: the pickle stream first, then out-of-band array memory."""
    if _plain(value):
        return [pickle.dumps(value, protocol=5)]
    buffers: list[Any] = []
    stream = io.BytesIO()
    _pickler()(stream, protocol=5, buffer_callback=buffers.append).dump(value)
    return [stream.getbuffer(), *[b.raw() for b in buffers]]


def loads(buffers: Sequence[Any]) -> Any:
    """The inverse of :func:`dumps`; arrays share memory with the received buffers."""
    if not buffers:
        raise WireFormatError("a pickled value needs at least one buffer")
    return pickle.loads(buffers[0], buffers=buffers[1:])
