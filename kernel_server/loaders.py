"""How each kind of model is read from a path or the hub and put on the device.

Every loader takes the request, the dtype, the device, a progress callback and a cancellation
check, and returns the loaded object with its tokenizer (``None`` for kinds without one); the
registry (``registry.py``) wraps that into a `LoadedModel`, measures it and logs it.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import decoding
from .device import Device
from .errors import BadRequest, NotFound, Unprocessable
from .progress import Steps

if TYPE_CHECKING:
    from mymps_magic.wire import LoadRequest

Progress = Callable[[str, float, str], None]
Loaded = tuple[Any, Any]
"""The loaded model (or pipeline) and its tokenizer, or ``None`` where the kind has none."""
Loader = Callable[["LoadRequest", torch.dtype, Device, Progress, Callable[[], None]], Loaded]


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for the one-line errors users see."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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



def _load_text(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
               check_cancelled: Callable[[], None]) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("tokenizer", 0.05, "loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(req.source, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("weights", 0.2, "loading the weights")
    with _weights_progress(progress, check_cancelled):
        model = AutoModelForCausalLM.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    # transformers wraps Module.to in functools.wraps, whose type loses the bound self.
    model = model.to(device.torch_device).eval()  # type: ignore[arg-type]
    decoding.prepare(model, tokenizer, progress)  # on CUDA: the decoding step compiled now, not in a request
    return model, tokenizer


def _load_auto(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
               check_cancelled: Callable[[], None]) -> Loaded:
    from transformers import AutoModel

    progress("weights", 0.2, "loading the weights")
    with _weights_progress(progress, check_cancelled):
        model = AutoModel.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    model = model.to(device.torch_device).eval()
    return model, None


def _load_diffusion(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                    check_cancelled: Callable[[], None]) -> Loaded:
    from diffusers import DiffusionPipeline

    progress("weights", 0.2, "loading the pipeline")
    pipe = DiffusionPipeline.from_pretrained(req.source, dtype=dtype, trust_remote_code=req.trust_remote_code)
    check_cancelled()
    progress("device", 0.8, f"moving to {device.kind}")
    pipe = pipe.to(device.torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, None


def _load_torchscript(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                      check_cancelled: Callable[[], None]) -> Loaded:
    progress("weights", 0.2, "loading the TorchScript module")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; its files still load
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(Path(req.source).expanduser()), map_location=device.torch_device)
    except RuntimeError as exc:
        raise BadRequest(f"{req.source!r} is not a TorchScript file ({first_line(exc)})") from exc
    module = module.to(dtype).eval()
    return module, None


def _load_checkpoint(req: LoadRequest, dtype: torch.dtype, device: Device, progress: Progress,
                     check_cancelled: Callable[[], None]) -> Loaded:
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
        raise BadRequest(f"{req.source!r} is not a readable state dict ({first_line(exc)})") from exc
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise BadRequest(f"the state dict does not fit {req.model_class}: {first_line(exc)}") from exc
    progress("device", 0.8, f"moving to {device.kind}")
    module = module.to(device.torch_device, dtype).eval()
    return module, None


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


LOADERS: dict[str, Loader] = {
    "text": _load_text,
    "auto": _load_auto,
    "diffusion": _load_diffusion,
    "torchscript": _load_torchscript,
    "checkpoint": _load_checkpoint,
}
