"""The loaded models: the five kinds, loading with progress, unloading, and their descriptions.

Loading and unloading run as jobs on the device worker (see ``jobs.py``); the registry itself
only guards its dict, so listing models never waits behind a job.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .device import Device
from .errors import BadRequest, NotFound, OutOfMemory, Unprocessable, is_out_of_memory
from .progress import Steps

KINDS = ("text", "diffusion", "auto", "torchscript", "checkpoint")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class LoadRequest:
    name: str
    kind: str = "text"
    dtype: str = "auto"
    path: str | None = None
    model_class: str | None = None
    trust_remote_code: bool = False

    @property
    def source(self) -> str:
        return self.path or self.name


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

    def touch(self) -> None:
        self.last_used = time.time()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
        }

    def info(self) -> dict[str, Any]:
        config = getattr(self.obj, "config", None)
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        elif config is not None:
            config = dict(config)
        return {**self.describe(), "source": self.source, "class": type(self.obj).__name__,
                "config": _jsonable(config)}


class Registry:
    """Name -> :class:`LoadedModel`, safe to read from the event loop while the worker loads."""

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

    def load(self, request: LoadRequest, progress: Progress, check_cancelled: Callable[[], None]) -> LoadedModel:
        """Load on the calling (worker) thread; a failure leaves the other models loaded."""
        if request.kind not in KINDS:
            raise Unprocessable(f"unknown kind {request.kind!r}; use one of {', '.join(KINDS)}")
        dtype = self._dtype(request.dtype)
        _check_source(request)
        progress("start", 0.0, f"loading {request.name} ({request.kind}, {str(dtype).removeprefix('torch.')})")
        try:
            model = _LOADERS[request.kind](request, dtype, self.device, progress, check_cancelled)
        except BaseException as exc:
            gc.collect()
            self.device.free_memory()
            if is_out_of_memory(exc):
                raise OutOfMemory(
                    f"not enough device memory to load {request.name!r}; the other models stay loaded. "
                    "Unload one (DELETE /models/NAME) or load with a smaller dtype"
                ) from exc
            if isinstance(exc, OSError):
                raise NotFound(f"cannot load {request.source!r}: {_first_line(exc)}") from exc
            raise
        model.parameters, model.bytes = _size(model.obj)
        model.request = request
        with self._lock:
            self._models[request.name] = model
        self._changed()
        progress("ready", 1.0, f"{request.name} is on {self.device.kind}")
        return model

    def unload(self, name: str) -> int:
        """Drop the model and give its device memory back; returns the bytes it held."""
        with self._lock:
            model = self._models.pop(name, None)
            loaded = ", ".join(self._models) or "none"
        if model is None:
            raise NotFound(f"model {name!r} is not loaded (loaded: {loaded})")
        freed = model.bytes
        del model
        gc.collect()
        self.device.free_memory()
        self._changed()
        return freed

    def _changed(self) -> None:
        if self._on_change is not None:
            with self._lock:
                requests = [m.request for m in self._models.values() if m.request is not None]
            self._on_change(requests)

    def _dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.device.default_dtype()
        if name not in DTYPES:
            raise Unprocessable(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]


def _quiet_libraries() -> None:
    """Load progress goes to the caller as events; the libraries' own bars would only fill the log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


@contextlib.contextmanager
def _weights_progress(progress: Progress, check_cancelled: Callable[[], None],
                      start: float = 0.2, end: float = 0.8) -> Iterator[None]:
    """transformers' own "Loading weights" bar (its loop over the tensors) as load progress from
    ``start`` to ``end``, in steps of at least 1%; each tensor is also a point where a cancelled
    load stops. Without the hook (an older transformers) the stages alone report progress."""
    from transformers.utils import logging as transformers_logging

    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return
    shown = [start]

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        iterable = args[0] if args else kwargs.get("iterable")
        if iterable is None or not str(kwargs.get("desc", "")).startswith("Loading weights"):
            return factory(*args, **kwargs)
        steps: Steps

        def on_progress(fraction: float) -> None:
            value = start + (end - start) * fraction
            if value - shown[0] >= 0.01 or fraction >= 1.0:
                shown[0] = value
                progress("weights", value, f"loading the weights ({steps.done}/{steps.total} tensors)")

        steps = Steps(iterable, kwargs.get("total"), check_cancelled, on_progress)
        return steps

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def _check_source(request: LoadRequest) -> None:
    path = Path(request.source).expanduser()
    if request.kind in ("torchscript", "checkpoint") or _looks_local(request.source):
        if not path.exists():
            raise NotFound(f"path {request.source!r} does not exist on the server")
    if request.kind == "checkpoint" and not request.model_class:
        raise Unprocessable("kind 'checkpoint' needs model_class, e.g. 'mypackage.nets:Net'")


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


def _load_text(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
               check_cancelled: Callable[[], None]) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("tokenizer", 0.05, "loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(req.source, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("weights", 0.2, "loading the weights")
    with _weights_progress(progress, check_cancelled):
        model = AutoModelForCausalLM.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    model = model.to(device.torch_device).eval()
    return LoadedModel(req.name, "text", dtype, device.kind, model, req.source, tokenizer=tokenizer)


def _load_auto(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
               check_cancelled: Callable[[], None]) -> LoadedModel:
    from transformers import AutoModel

    progress("weights", 0.2, "loading the weights")
    with _weights_progress(progress, check_cancelled):
        model = AutoModel.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    model = model.to(device.torch_device).eval()
    return LoadedModel(req.name, "auto", dtype, device.kind, model, req.source)


def _load_diffusion(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                    check_cancelled: Callable[[], None]) -> LoadedModel:
    from diffusers import DiffusionPipeline

    progress("weights", 0.2, "loading the pipeline")
    pipe = DiffusionPipeline.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    pipe = pipe.to(device.torch_device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(req.name, "diffusion", dtype, device.kind, pipe, req.source)


def _load_torchscript(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                      check_cancelled: Callable[[], None]) -> LoadedModel:
    progress("weights", 0.2, "loading the TorchScript module")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; its files still load
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(Path(req.source).expanduser()), map_location=device.torch_device)
    except RuntimeError as exc:
        raise BadRequest(f"{req.source!r} is not a TorchScript file ({_first_line(exc)})") from exc
    module = module.to(dtype).eval()
    return LoadedModel(req.name, "torchscript", dtype, device.kind, module, req.source)


def _load_checkpoint(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                     check_cancelled: Callable[[], None]) -> LoadedModel:
    progress("class", 0.05, f"importing {req.model_class}")
    cls = _import_class(str(req.model_class))
    module = cls()
    if not isinstance(module, torch.nn.Module):
        raise BadRequest(f"{req.model_class} is not a torch.nn.Module")
    progress("weights", 0.2, "reading the state dict")
    path = Path(req.source).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadRequest(f"{req.source!r} is not a readable state dict ({_first_line(exc)})") from exc
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise BadRequest(f"the state dict does not fit {req.model_class}: {_first_line(exc)}") from exc
    progress("device", 0.8, f"moving to {device.kind}")
    module = module.to(device.torch_device, dtype).eval()
    return LoadedModel(req.name, "checkpoint", dtype, device.kind, module, req.source)


def _import_class(spec: str) -> type:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise Unprocessable(f"model_class {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotFound(f"cannot import {module_name!r} on the server ({exc}); install it there") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise NotFound(f"{module_name!r} has no class {attr!r}")
    return cls


_LOADERS: dict[str, Callable[..., LoadedModel]] = {
    "text": _load_text,
    "auto": _load_auto,
    "diffusion": _load_diffusion,
    "torchscript": _load_torchscript,
    "checkpoint": _load_checkpoint,
}
