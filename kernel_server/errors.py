"""The server's errors: those that stop it starting, and those it answers a request with.

A `ServerStartError` ends ``mymps serve`` before it listens, with its message as the one line on
stderr and exit status 2, never a traceback:

    ServerStartError
    ├── SettingsError (also ValueError)     a bad option or variable, a non-loopback bind, a busy port
    ├── DeviceError (also RuntimeError)     the requested device is not available here
    └── TokenFileError                      the token file is empty

A `ServerError` is turned into an ``{"error": "..."}`` answer with its status. Anything raised
while serving a request that is not one of these becomes a 500 whose message still names the
exception; none of them ever stops the server or unloads a model.

    ServerError (500)
    ├── BadRequest (400)      malformed body, input the model rejects
    ├── NotFound (404)        unknown model, job or path
    ├── Unprocessable (422)   a field out of range or of the wrong type
    ├── Cancelled (409)       the job was cancelled before it finished
    ├── Conflict (409)        the name is loaded as another kind or dtype
    └── OutOfMemory (507)     a load does not fit in the memory that is free, or the device ran out
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from mymps_magic import wire


class ServerStartError(Exception):
    """The server cannot start; the message is the one line ``mymps serve`` prints."""


class SettingsError(ServerStartError, ValueError):
    """A setting has a bad value; the message names where it came from and what is allowed."""


class DeviceError(ServerStartError, RuntimeError):
    """The requested device is not available here; the message lists what is."""


class TokenFileError(ServerStartError):
    """The token file holds no token; the message names the file and what to do."""


class ServerError(Exception):
    """A request failed; ``status`` is the HTTP status of the answer, ``message`` its ``error``."""

    status = 500
    code: str | None = None  # the body's ``code``, where the status alone is ambiguous

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServerError):
    status = 400


class NotFound(ServerError):
    status = 404


class Cancelled(ServerError):
    status = 409


class Conflict(ServerError):
    status = 409
    code = wire.ERROR_CONFLICT


class Unprocessable(ServerError):
    status = 422


class OutOfMemory(ServerError):
    status = 507


_OUT_OF_MEMORY_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError, Python's MemoryError, and the plain RuntimeError of the
    MPS and CPU allocators that says the same ("MPS backend out of memory", "DefaultCPUAllocator:
    can't allocate memory")."""
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _OUT_OF_MEMORY_WORDS)
    )


def as_server_error(exc: BaseException) -> ServerError:
    """Map any exception from a job to the error the client sees."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError)):
        return Cancelled("the job was cancelled before it finished")
    if is_out_of_memory(exc):
        return OutOfMemory(
            f"the device ran out of memory ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]}); "
            "unload a model (`DELETE /models/NAME`) or use a smaller input or dtype"
        )
    return ServerError(f"{type(exc).__name__}: {exc}")
