"""How a text model decodes on each device: the KV cache ``model.generate`` is given, and whether
its decoding step is compiled.

Plain ``model.generate`` is launch-bound on a GPU: on an NVIDIA H200 a 1.1B fp16 model decoded
62 tokens/s in-process, about 2% of what its memory bandwidth allows. transformers' own static KV
cache lets it compile the one-token decoding step (``torch.compile``, CUDA graphs through the
``reduce-overhead`` mode), which gave 251 tokens/s (3.6x) and 709 tokens/s for GPT-2 (3.4x), after
a warm-up of 33 s and 9 s. So, decided per device:

* ``cuda``: a static cache and the compiled step. A static cache has a fixed length, and each
  length is a compiled graph of its own, so lengths are bucketed (:func:`bucket`: powers of two
  from 256), one cache per bucket is kept with the model and reused, and the first bucket is
  compiled at load time (:func:`prepare`, the load's ``compile`` stage) rather than in a user's
  first request.
* ``cpu``: plain ``generate`` with its dynamic cache. transformers compiles only on accelerators,
  and an uncompiled static cache attends over its whole length every step, slower than the
  dynamic one.
* ``mps``: plain ``generate``. Inductor's CUDA graphs do not exist there, and transformers does
  not compile on it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FIRST_BUCKET = 256
"""The shortest static cache, and the one compiled at load time: a prompt of a few hundred tokens
and ``max_new_tokens``' default (64) fit in it."""

_CACHES = "_mymps_static_caches"
"""The attribute of a model that holds its static caches by length. They live with the model, as
transformers keeps its own ``_cache`` there, so that they go when it is unloaded."""

Progress = Callable[[str, float, str], None]


def cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (after 5.17); speak whichever the model knows."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prepare(model: Any, tokenizer: Any, progress: Progress) -> None:
    """What a text model's load does last: compile its decoding where :class:`Decoding` compiles
    (see :meth:`Decoding.prepare`)."""
    Decoding.for_model(model).prepare(model, tokenizer, progress)


def bucket(length: int) -> int:
    """The static cache length for a generation that needs ``length`` positions: the smallest
    power of two from :data:`FIRST_BUCKET` that holds it, so that a server compiles at most one
    graph per doubling rather than one per request length."""
    size = FIRST_BUCKET
    while size < length:
        size *= 2
    return size


@dataclass(frozen=True)
class Decoding:
    """How ``generate`` decodes one model.

    Attributes:
        static: a static KV cache, one per :func:`bucket`, kept with the model.
        compiled: the decoding step compiled by transformers (it does so for a static cache on
            CUDA); False passes ``disable_compile``.
    """

    static: bool
    compiled: bool

    @classmethod
    def for_model(cls, model: Any) -> Decoding:
        """The device's choice (see the module's docstring), for a model whose class transformers
        can compile whole (``_can_compile_fullgraph``); other models decode plainly."""
        device = next(model.parameters()).device
        fast = device.type == "cuda" and bool(getattr(model, "_can_compile_fullgraph", False))
        return cls(static=fast, compiled=fast)

    def options(self, model: Any, length: int) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` for a generation of ``length`` positions
        (prompt plus new tokens)."""
        if not self.static:
            return {}
        from transformers import StaticCache

        caches: dict[int, Any] = model.__dict__.setdefault(_CACHES, {})
        size = bucket(length)
        cache = caches.get(size)
        if cache is None:
            cache = caches[size] = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=size)
        else:
            cache.reset()
        return {cache_keyword(model): cache, "disable_compile": not self.compiled}

    def prepare(self, model: Any, tokenizer: Any, progress: Progress) -> None:
        """Compile the first bucket's decoding step now, at load time, by generating with it:
        transformers compiles on the first call and records the CUDA graphs on the next ones.
        Reported as the ``compile`` stage; nothing to do where nothing is compiled."""
        if not self.compiled:
            return
        progress("compile", 0.85, f"compiling the decoding step for {FIRST_BUCKET} positions (once per model)")
        start = time.perf_counter()
        ids = tokenizer("Once upon a time", return_tensors="pt").input_ids.to(next(model.parameters()).device)
        for _ in range(3):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           pad_token_id=0, **self.options(model, FIRST_BUCKET))
        progress("compile", 0.95, f"decoding compiled in {time.perf_counter() - start:.1f} s")
