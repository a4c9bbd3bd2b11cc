"""`MympsClient`: the original mymps v0.1 client's interface, over our `Client`.

The original's users call ``MympsClient(host, port, timeout)`` positionally and rely on its
defaults: ``load_model`` loads float16, ``generate`` and ``stream_generate`` sample 256 tokens at
temperature 1 and top-p 1. Our `Client` keeps its own defaults (``wire.GenerateRequest``: the
model's ``generation_config`` decides), so the original's live here, in a subclass that changes
nothing but signatures and defaults; everything else (``health``, ``unload_model``, ``infer``,
the stream's ``.result``) is `Client`'s, which already answers as the original did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mymps_magic.client import DEFAULT_TIMEOUT, Client

if TYPE_CHECKING:
    from mymps_magic._stream import TokenStream
    from mymps_magic.wire import KeepAlive, ProgressEvent

ORIGINAL_DTYPE = "float16"
ORIGINAL_MAX_NEW_TOKENS = 256
ORIGINAL_TEMPERATURE = 1.0
ORIGINAL_TOP_P = 1.0


class MympsClient(Client):
    """The original client: ``MympsClient(host, port, timeout)``, its methods and defaults.

    Example:
        >>> client = MympsClient()                                           # doctest: +SKIP
        >>> client.load_model("microsoft/phi-2")                             # doctest: +SKIP
        >>> client.generate("microsoft/phi-2", "Hello", max_new_tokens=64)["text"]  # doctest: +SKIP

    Args:
        host, port: as for `Client` (the environment, else ``127.0.0.1:5555``).
        timeout: seconds to wait for a short call, as for `Client`.
        token: the server's token, as for `Client` (the one thing the original did not need).
        token_file: as for `Client`.
    """

    def __init__(self, host: str | None = None, port: int | None = None, timeout: float = DEFAULT_TIMEOUT, *,
                 token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> None:
        super().__init__(host, port, token=token, token_file=token_file, timeout=timeout)

    def __repr__(self) -> str:
        return f"MympsClient({self.settings.address!r})"

    def __enter__(self) -> MympsClient:
        return self

    def list_models(self) -> list[dict[str, Any]]:
        """The original's name for `Client.models`: each ``{"name", "device", "loaded_at", ...}``."""
        return self.models()

    def load_model(self, name: str, dtype: str = ORIGINAL_DTYPE,  # type: ignore[override]
                   kind: str | None = None, *, path: str | None = None, model_class: str | None = None,
                   trust_remote_code: bool = False,
                   progress: bool | Callable[[ProgressEvent], None] = True,
                   keep_alive: KeepAlive | None = None) -> dict[str, Any]:
        """`Client.load_model` with the original's order and default: ``load_model(name, dtype="float16")``.

        ``dtype`` takes torch's spellings too (``half``, ``float``, ``bf16``...). float16 on a CPU
        server loads and runs, slower than float32 there: pass ``dtype="auto"`` for the device's choice.
        """
        return super().load_model(name, kind, dtype, path=path, model_class=model_class,
                                  trust_remote_code=trust_remote_code, progress=progress, keep_alive=keep_alive)

    def generate(self, model: str, prompt: str, max_new_tokens: int = ORIGINAL_MAX_NEW_TOKENS,
                 temperature: float | None = ORIGINAL_TEMPERATURE, top_p: float | None = ORIGINAL_TOP_P, *,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, keep_alive: KeepAlive | None = None) -> dict[str, Any]:
        """`Client.generate` with the original's defaults (256 tokens, temperature 1, top-p 1)."""
        return super().generate(model, prompt, max_new_tokens, temperature, top_p, seed=seed, stop=stop,
                                top_k=top_k, repetition_penalty=repetition_penalty, keep_alive=keep_alive)

    def stream_generate(self, model: str, prompt: str, max_new_tokens: int = ORIGINAL_MAX_NEW_TOKENS,
                        temperature: float | None = ORIGINAL_TEMPERATURE, top_p: float | None = ORIGINAL_TOP_P, *,
                        seed: int | None = None, stop: str | Sequence[str] | None = None, top_k: int | None = None,
                        repetition_penalty: float | None = None, keep_alive: KeepAlive | None = None) -> TokenStream:
        """`Client.stream_generate` with the original's defaults; the stream's ``.result`` holds
        the original's figures (``text``, ``tokens_generated``, ``time_s``, ``tokens_per_s``,
        ``stop_reason``) once it ends."""
        return super().stream_generate(model, prompt, max_new_tokens, temperature, top_p, seed=seed, stop=stop,
                                       top_k=top_k, repetition_penalty=repetition_penalty, keep_alive=keep_alive)
