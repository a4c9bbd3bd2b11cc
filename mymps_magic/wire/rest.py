"""The REST side of the wire: ``/infer`` tensor maps, ``/models/load`` NDJSON progress, error
bodies, and the generate request of ``POST /generate`` and ``/ws/generate``.

* ``/infer`` bodies, kept compatible with the original mymps ``tensor.py``: a msgpack map of
  ``name -> {"shape": [..], "dtype": "float32", "data": <raw array bytes>}``.
* ``/models/load`` progress: NDJSON lines ``{"event": "progress", "stage", "progress", "message"}``
  ending with the same object the plain request answers (``{"status": "ok", ...}``) or an error
  line ``{"error": "..."}``.
* Errors: JSON ``{"error": "..."}`` with a fitting HTTP status.
* Generation: :class:`GenerateRequest`, the body of ``POST /generate`` and the first message of
  ``/ws/generate``; its defaults and limits are the server's too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import WireFormatError

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


def progress_event(stage: str, progress: float, message: str = "") -> dict[str, Any]:
    """One ``/models/load`` progress event; ``progress`` runs from 0.0 to 1.0."""
    return {"event": EVENT_PROGRESS, "stage": stage, "progress": round(float(progress), 4), "message": message}


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


MAX_NEW_TOKENS = 8192
MAX_TEMPERATURE = 10.0
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, as the client sends it and the server runs it: the one place for its
    fields, defaults and limits (the server's pydantic body takes them from here, so that its
    OpenAPI schema shows them).

    Args:
        model: the name of a loaded text model.
        prompt: the text to continue (not empty).
        max_new_tokens: at most this many new tokens (1 to :data:`MAX_NEW_TOKENS`).
        temperature: 0 for greedy decoding, up to :data:`MAX_TEMPERATURE`.
        top_p: nucleus sampling mass, above 0 and at most 1.
        seed: makes sampling repeatable (0 to 2**63-1), or None.
        stop: strings that end the generation (at most :data:`MAX_STOP_STRINGS`).
    """

    model: str
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent; ``seed`` and ``stop`` only where given."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                                "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        return body

    @classmethod
    def from_json(cls, body: Any) -> GenerateRequest:
        """Read and check a request written by :meth:`to_json` (left-out fields take the defaults).

        Raises:
            WireFormatError: a field is missing, unknown, of the wrong type or out of its range.
        """
        if not isinstance(body, Mapping):
            raise WireFormatError("a generate request must be a JSON object {model, prompt, max_new_tokens, ...}")
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise WireFormatError(f"unknown generate field(s) {', '.join(map(repr, unknown))}; "
                                  f"known: {', '.join(cls.__dataclass_fields__)}")
        model, prompt = body.get("model"), body.get("prompt")
        if not isinstance(model, str) or not model or not isinstance(prompt, str) or not prompt:
            raise WireFormatError("a generate request needs 'model' and 'prompt' as non-empty strings")
        tokens = body.get("max_new_tokens", cls.max_new_tokens)
        temperature = body.get("temperature", cls.temperature)
        top_p = body.get("top_p", cls.top_p)
        seed = body.get("seed")
        stop = body.get("stop") or []
        if not _is_int(tokens) or not 1 <= tokens <= MAX_NEW_TOKENS:
            raise WireFormatError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, not {tokens!r}")
        if not _is_number(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise WireFormatError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {temperature!r}")
        if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
            raise WireFormatError(f"top_p must be a number above 0 and at most 1, not {top_p!r}")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
            raise WireFormatError(f"seed must be an integer from 0 to 2**63-1 or null, not {seed!r}")
        if (not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) for s in stop)):
            raise WireFormatError(f"stop must be a list of at most {MAX_STOP_STRINGS} strings, not {stop!r}")
        return cls(model, prompt, int(tokens), float(temperature), float(top_p), seed, tuple(stop))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
