"""Values as cloudpickle protocol 5 with out-of-band buffers: buffer 0 is the pickle stream, the
rest are the raw memory of numpy arrays and tensors. Torch tensors are reduced through numpy
(their own reducer would copy the storage in-band) and come back as torch tensors where torch is
importable, else as numpy arrays.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import WireFormatError


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
