"""The loaded models: loading with progress, unloading, and their descriptions.

Loading and unloading run as jobs on the device worker (see ``jobs.py``); the registry itself
only guards its dict, so listing models never waits behind a job. How each kind is read lives in
``loaders.py``, how the kind is found from the source in ``detect.py``.

How long a model stays loaded once idle (its ``keep_alive``), and which models a load that does
not fit unloads, is ``lifetime.py``'s to decide: it attaches itself as the registry's `Keeper`.

Every load, failed load and unload is one line of the ``kernel_server.registry`` log (name, kind,
dtype, seconds, bytes), so ``server.log`` tells what was on the device when.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from mymps_magic.wire import DETECT, KINDS, LoadRequest
from mymps_magic.wire.keepalive import FOREVER, parse_keep_alive

from . import detect, footprint
from .device import Device
from .errors import BadRequest, Conflict, NotFound, OutOfMemory, Unprocessable, as_server_error, is_out_of_memory
from .loaders import LOADERS, Progress, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``, as users write it."""
    return str(dtype).removeprefix("torch.")


@dataclass
class LoadedModel:
    """A model (or pipeline) resident on the device, with what users see of it."""

    name: str
    kind: str
    dtype: torch.dtype
    device: str
    obj: Any
    source: str
    tokenizer: Any = None
    request: LoadRequest | None = None
    parameters: int = 0
    bytes: int = 0
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    keep_alive: float = FOREVER
    """Seconds it stays loaded once idle (counted from ``last_used``); -1: until unloaded."""
    evicted: tuple[str, ...] = ()
    """The models its load unloaded to make room."""

    def touch(self) -> None:
        self.last_used = time.time()

    @property
    def expires_at(self) -> float | None:
        """When it is unloaded if nothing uses it meanwhile; None: never."""
        return None if self.keep_alive < 0 else self.last_used + self.keep_alive

    def describe(self) -> dict[str, Any]:
        expires = self.expires_at
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": dtype_name(self.dtype),
            "device": self.device,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "keep_alive": self.keep_alive,
            "expires_at": None if expires is None else datetime.fromtimestamp(expires, timezone.utc).isoformat(),
        }

    def info(self) -> dict[str, Any]:
        config = getattr(self.obj, "config", None)
        if config is not None:
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return {**self.describe(), "source": self.source, "class": type(self.obj).__name__,
                "config": _jsonable(config)}


class Keeper(Protocol):
    """What decides how long models stay and what a load may unload (``lifetime.Lifetime``)."""

    default_keep_alive: float

    def make_room(self, name: str, needed: int) -> list[str]:
        """Unload idle models until ``needed`` bytes are free for ``name``; the names unloaded.

        Raises:
            OutOfMemory: it cannot fit, or may not unload what would make it fit.
        """

    def changed(self) -> None:
        """A model was loaded or unloaded."""

    def free(self) -> int:
        """Bytes a load may still take."""


class Registry:
    """Name -> :class:`LoadedModel`, safe to read from the event loop while the worker loads."""

    keeper: Keeper | None = None
    """Set by the `Keeper` itself once the server state is built; without one, models stay loaded
    until unloaded and a load is tried whatever its size."""

    def __init__(self, device: Device, on_change: Callable[[list[LoadRequest]], None] | None = None) -> None:
        """``on_change`` gets the load requests of every loaded model after each load and unload
        (the ``--restore`` state file)."""
        self.device = device
        self._on_change = on_change
        _quiet_libraries()
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.describe() for m in self._models.values()]

    def models(self) -> list[LoadedModel]:
        """The loaded models, a snapshot."""
        with self._lock:
            return list(self._models.values())

    def find(self, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(name)

    def get(self, name: str, kinds: tuple[str, ...] | None = None) -> LoadedModel:
        """The loaded model called ``name``.

        Raises:
            NotFound: nothing of that name is loaded; the message lists what is.
            BadRequest: it is loaded but of a kind this request cannot use.
        """
        with self._lock:
            model = self._models.get(name)
            loaded = ", ".join(self._models) or "none"
        if model is None:
            raise NotFound(f"model {name!r} is not loaded (loaded: {loaded}); load it first: "
                           "%mymps load NAME, Client.load_model or POST /models/load")
        if kinds is not None and model.kind not in kinds:
            raise BadRequest(f"model {name!r} is a {model.kind} model; this needs a {' or '.join(kinds)} model")
        return model

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def already_loaded(self, request: LoadRequest) -> bool:
        """Whether a model of this name is loaded as ``request`` asks (a load is then a no-op).

        A request that leaves the kind to detection, or the dtype ``auto``, takes the loaded
        model as it is: re-running a notebook's load cell must not fail. An explicit other kind
        or dtype is refused rather than ignored: the caller would otherwise compute with a model
        they did not ask for.

        Raises:
            Conflict: the name is loaded as another kind or dtype; the message says to unload it.
        """
        with self._lock:
            model = self._models.get(request.name)
        if model is None:
            return False
        loaded_dtype = dtype_name(model.dtype)
        wanted = [want for want, have, any_ in ((request.kind, model.kind, DETECT),
                                                (request.dtype, loaded_dtype, "auto")) if want not in (have, any_)]
        if wanted:
            name = request.name
            raise Conflict(f"`{name}` is loaded as {model.kind}/{loaded_dtype}; unload it first "
                           f"(`DELETE /models/{name}`, `%mymps unload {name}`) to load it as {'/'.join(wanted)}")
        return True

    def load(self, request: LoadRequest, progress: Progress, check_cancelled: Callable[[], None]) -> LoadedModel:
        """Load on the calling (worker) thread; a failure leaves the other models loaded.

        The kind is detected from the source when the request leaves it to ``detect``, and an
        explicit kind that does not fit the source is refused before anything is read.
        """
        started = time.perf_counter()
        try:
            model = self._load(request, progress, check_cancelled)
        except BaseException as exc:
            log.warning("could not load %s (%s, %s): %s", request.name, request.kind, request.dtype,
                        first_line(as_server_error(exc)))
            raise
        log.info("loaded %s (%s, %s) in %.2f s, %d bytes", model.name, model.kind, dtype_name(model.dtype),
                 time.perf_counter() - started, model.bytes)
        return model

    def _load(self, request: LoadRequest, progress: Progress, check_cancelled: Callable[[], None]) -> LoadedModel:
        if request.kind not in (*KINDS, DETECT):
            raise Unprocessable(f"unknown kind {request.kind!r}; use one of {', '.join(KINDS)}")
        dtype = self._dtype(request.dtype)
        _check_exists(request)
        label = f"`{request.name}`" if request.path is None else f"`{request.name}` (`{request.path}`)"
        kind = detect.resolve_kind(request.kind, request.source, label)
        if kind == "checkpoint" and not request.model_class:
            raise Unprocessable("kind 'checkpoint' needs model_class, e.g. 'mypackage.nets:Net'")
        progress("start", 0.0, f"loading {request.name} ({kind}, {dtype_name(dtype)})")
        needed = footprint.estimate(request.source, torch.empty((), dtype=dtype).element_size())
        evicted = self.keeper.make_room(request.name, needed) if self.keeper and needed else []
        if evicted:
            progress("evicted", 0.0, f"unloaded {', '.join(evicted)} to make room")
        try:
            obj, tokenizer = LOADERS[kind](request, dtype, self.device, progress, check_cancelled)
        except BaseException as exc:
            gc.collect()
            self.device.free_memory()
            if is_out_of_memory(exc):
                free = self.keeper.free() if self.keeper is not None else self.device.free()
                raise OutOfMemory(_allocator_failure(request.name, exc, needed, free, self.device.kind)) from exc
            if isinstance(exc, OSError):
                raise NotFound(f"cannot load {request.source!r}: {first_line(exc)}") from exc
            raise
        model = LoadedModel(request.name, kind, dtype, self.device.kind, obj, request.source, tokenizer=tokenizer,
                            keep_alive=self._keep_alive(request), evicted=tuple(evicted))
        model.parameters, model.bytes = _size(obj)
        model.request = replace(request, kind=kind)  # --restore loads it as what it turned out to be
        with self._lock:
            self._models[request.name] = model
        self._changed()
        progress("ready", 1.0, f"{request.name} is on {self.device.kind}")
        return model

    def unload(self, name: str, why: str = "") -> int:
        """Drop the model and give its device memory back; returns the bytes it held. ``why``
        ends the log line when it was not a client's request (``: idle for 5m``)."""
        started = time.perf_counter()
        with self._lock:
            model = self._models.pop(name, None)
            loaded = ", ".join(self._models) or "none"
        if model is None:
            raise NotFound(f"model {name!r} is not loaded (loaded: {loaded})")
        freed, kind, dtype = model.bytes, model.kind, dtype_name(model.dtype)
        del model
        gc.collect()
        self.device.free_memory()
        self._changed()
        log.info("unloaded %s (%s, %s) in %.2f s, %d bytes freed%s", name, kind, dtype,
                 time.perf_counter() - started, freed, f": {why}" if why else "")
        return freed

    def _changed(self) -> None:
        if self._on_change is not None:
            with self._lock:
                requests = [m.request for m in self._models.values() if m.request is not None]
            self._on_change(requests)
        if self.keeper is not None:
            self.keeper.changed()

    def _keep_alive(self, request: LoadRequest) -> float:
        if request.keep_alive is not None:
            return parse_keep_alive(request.keep_alive)
        return self.keeper.default_keep_alive if self.keeper is not None else FOREVER

    def _dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.device.default_dtype()
        if name not in DTYPES:
            raise Unprocessable(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]


_ASKED = re.compile(r"allocate (\d+) bytes|allocate (\d+(?:\.\d+)?) ([KMGT]i?B)", re.IGNORECASE)
_UNIT = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _allocator_failure(name: str, exc: BaseException, estimate: int | None, free: int, where: str) -> str:
    """The 507's one line when the allocator itself refused: what it was asked for (CPU's "you
    tried to allocate N bytes", CUDA's "Tried to allocate 2.00 GiB"), else the estimate."""
    needed: float | None = estimate
    if match := _ASKED.search(str(exc)):
        exact, number, unit = match.groups()
        needed = int(exact) if exact else float(number) * _UNIT[unit[0].lower()]
    wanted = f"needs {footprint.format_size(needed)}" if needed else "needs more memory"
    return (f"loading {name} {wanted} but {footprint.format_size(free)} is free on {where}; "
            "the other models stay loaded: unload one (DELETE /models/NAME) or load with a smaller dtype")


def _quiet_libraries() -> None:
    """Load progress goes to the caller as events; the libraries' own bars would only fill the log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def _check_exists(request: LoadRequest) -> None:
    """A path on the server (or the file of a kind that only loads from one) must exist."""
    local = request.kind in ("torchscript", "checkpoint") or detect.looks_local(request.source)
    if local and not Path(request.source).expanduser().exists():
        raise NotFound(f"path {request.source!r} does not exist on the server")


def _size(obj: Any) -> tuple[int, int]:
    modules = [obj] if isinstance(obj, torch.nn.Module) else [
        c for c in getattr(obj, "components", {}).values() if isinstance(c, torch.nn.Module)
    ]
    params = nbytes = 0
    for module in modules:
        for p in module.parameters():
            params += p.numel()
            nbytes += p.numel() * p.element_size()
        for b in module.buffers():
            nbytes += b.numel() * b.element_size()
    return params, nbytes


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
