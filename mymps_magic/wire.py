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
"""

from __future__ import annotations

import json
from typing import Any, Mapping

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

# Event type of a /models/load progress line.
EVENT_PROGRESS = "progress"


class WireFormatError(ValueError):
    """A payload does not follow the wire format; the message says which part is wrong."""


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


def error_body(message: str, status: int | None = None) -> dict[str, Any]:
    """The JSON body of every error answer; ``status`` is added where no HTTP status carries it
    (an NDJSON line, a WebSocket frame)."""
    return {"error": message} if status is None else {"error": message, "status": status}
