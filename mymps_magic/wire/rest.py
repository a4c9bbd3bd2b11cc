"""The REST side of the wire: ``/infer`` tensor maps, ``/models/load`` NDJSON progress and error
bodies (the request bodies are in :mod:`.bodies`, the ``/ws/generate`` messages in
:mod:`.generate_stream`).

* ``/infer`` bodies, kept compatible with the original mymps ``tensor.py``: a msgpack map of
  ``name -> {"shape": [..], "dtype": "float32", "data": <raw array bytes>}``, content type
  :data:`MSGPACK` (the original's). The model is named in the :data:`HEADER_MODEL` header; the
  answer's floating-point outputs are float32, as the original's were, unless the
  :data:`HEADER_DTYPE` header says :data:`DTYPE_NATIVE` (the model's own dtype: float16 stays
  float16, half the bytes; bfloat16, which numpy lacks, still comes as float32).
* ``/models/load`` progress: NDJSON lines ``{"event": "progress", "stage", "progress", "message"}``
  ending with the same object the plain request answers (``{"status": "ok", ...}``) or an error
  line ``{"error": "..."}``.
* Errors: JSON ``{"error": "..."}`` with a fitting HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import WireFormatError

HEADER_MODEL = "x-model"
HEADER_DTYPE = "x-dtype"
DTYPE_NATIVE = "native"
DTYPE_FLOAT32 = "float32"
MSGPACK = "application/x-msgpack"
NDJSON = "application/x-ndjson"

# Event type of a /models/load progress line.
EVENT_PROGRESS = "progress"


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
    packed: bytes = msgpack.packb(out, use_bin_type=True)
    return packed


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


@dataclass(frozen=True)
class ProgressEvent:
    """One ``/models/load`` progress line, as :func:`read_progress_event` reads it."""

    stage: str
    progress: float
    message: str


def progress_event(stage: str, progress: float, message: str = "") -> dict[str, Any]:
    """One ``/models/load`` progress event; ``progress`` runs from 0.0 to 1.0."""
    return {"event": EVENT_PROGRESS, "stage": stage, "progress": round(float(progress), 4), "message": message}


def read_progress_event(line: Any) -> ProgressEvent | None:
    """The progress event an NDJSON line of ``/models/load`` holds, or None for any other line
    (the final answer)."""
    if not isinstance(line, Mapping) or line.get("event") != EVENT_PROGRESS:
        return None
    progress = line.get("progress", 0)
    return ProgressEvent(str(line.get("stage") or ""), float(progress) if _is_number(progress) else 0.0,
                         str(line.get("message") or ""))


def ndjson_line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def error_body(message: str, status: int | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of every error answer; ``status`` is added where no HTTP status carries it
    (an NDJSON line, a WebSocket frame), ``code`` where the status alone is ambiguous (409: see
    :mod:`.codes`)."""
    body: dict[str, Any] = {"error": message}
    if status is not None:
        body["status"] = status
    if code is not None:
        body["code"] = code
    return body


@dataclass(frozen=True)
class ErrorBody:
    """An error answer as :func:`read_error_body` reads it; ``message`` is empty where the
    server gave none, ``status`` and ``code`` None where the body does not carry them."""

    message: str
    status: int | None = None
    code: str | None = None


def read_error_body(body: Any) -> ErrorBody | None:
    """The error a decoded JSON body (an answer, an NDJSON line, a WebSocket message) carries,
    or None when it is not an error body."""
    if not isinstance(body, Mapping) or "error" not in body or "event" in body:
        return None
    status, code = body.get("status"), body.get("code")
    return ErrorBody(str(body["error"] or ""), status if isinstance(status, int) and not isinstance(status, bool)
                     else None, code if isinstance(code, str) else None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
