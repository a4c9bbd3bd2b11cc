"""`RestCalls`: the part of a `Client` that calls the server's HTTP endpoints.

Each method builds one request body, sends it through the `Connection` (where transport errors
become `MympsError`s) and turns the answer into what `Client` promises: PIL images, numpy
arrays, a load's progress bar. `Client` declares the public methods and delegates here.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mymps_magic import errors, wire
from mymps_magic._stream import TokenStream

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

    from mymps_magic._connection import Connection


class RestCalls:
    """The server's HTTP endpoints, one method each.

    Args:
        connection: the client's transport (kept-alive HTTP, its timeouts and token).
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def health(self) -> dict[str, Any]:
        return self._connection.json("GET", "/health")

    def stats(self) -> dict[str, Any]:
        return self._connection.json("GET", "/stats")

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._connection.json("GET", "/jobs")["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._connection.json("DELETE", f"/jobs/{_path_segment(job_id)}")

    def models(self) -> list[dict[str, Any]]:
        """``GET /models``: a plain list, the original's shape (so not through `Connection.json`)."""
        response = self._connection.request("GET", "/models")
        try:
            listed = response.json()
        except ValueError:
            listed = None
        if not isinstance(listed, list) or not all(isinstance(item, dict) for item in listed):
            raise errors.ServerError(f"The server's answer to /models is not a list of models (HTTP "
                                     f"{response.status_code}). Is a mymps server listening there (`mymps serve`)?")
        return listed

    def load_model(self, name: str, kind: str | None, dtype: str, path: str | None, model_class: str | None,
                   trust_remote_code: bool,
                   progress: bool | Callable[[wire.ProgressEvent], None],
                   keep_alive: wire.KeepAlive | None = None) -> dict[str, Any]:
        body = wire.LoadRequest(name, wire.DETECT if kind is None else kind, dtype, path, model_class,
                                trust_remote_code, keep_alive).to_json()
        if progress is False:
            return self._connection.json("POST", "/models/load", json_body=body, wait=True)
        if callable(progress):
            return self._load_with_progress(body, progress)
        return self._load_with_bar(body)

    def _load_with_bar(self, body: dict[str, Any]) -> dict[str, Any]:
        from tqdm.auto import tqdm

        # The bar appears with the first progress event, so that a request the server rejects
        # at once (bad kind, unknown path) prints only its error.
        bar: tqdm[Any] | None = None

        def show(event: wire.ProgressEvent) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=100, desc=f"Loading {body['name']}", bar_format="{l_bar}{bar}| {elapsed}{postfix}")
            bar.set_postfix_str(event.message or event.stage, refresh=False)
            bar.update(max(0, round(event.progress * 100) - bar.n))

        try:
            final = self._load_with_progress(body, show)
            if bar is not None:
                bar.update(100 - bar.n)
            return final
        finally:
            if bar is not None:
                bar.close()

    def _load_with_progress(self, body: dict[str, Any],
                            on_event: Callable[[wire.ProgressEvent], None]) -> dict[str, Any]:
        final: dict[str, Any] | None = None
        for line in self._connection.ndjson("POST", "/models/load", json_body=body):
            event = wire.read_progress_event(line)
            if event is None:
                final = line
            else:
                on_event(event)
        if final is None:
            raise errors.ServerError("The server ended the load without saying how it went; see its log.")
        return final

    def unload_model(self, name: str) -> dict[str, Any]:
        return self._connection.json("DELETE", f"/models/{_path_segment(name)}")

    def model_info(self, name: str) -> dict[str, Any]:
        return self._connection.json("GET", f"/models/{_path_segment(name)}/info")

    def generate(self, request: wire.GenerateRequest) -> dict[str, Any]:
        return self._connection.json("POST", "/generate", json_body=request.to_json(), wait=True)

    def stream_generate(self, request: wire.GenerateRequest) -> TokenStream:
        return TokenStream(self._connection, request)

    def image(self, model: str, prompt: str, steps: int, seed: int | None, guidance_scale: float | None,
              width: int | None, height: int | None, num_images: int) -> list[Image]:
        body = wire.ImageRequest(model, prompt, steps, seed, guidance_scale, width, height, num_images).to_json()
        answer = self._connection.json("POST", "/image", json_body=body, wait=True)

        from PIL import Image as PILImage

        images: list[Image] = []
        for encoded in answer["images"]:
            image = PILImage.open(io.BytesIO(base64.b64decode(encoded)))
            image.load()
            images.append(image)
        return images

    def infer(self, model: str, inputs: Mapping[str, Any], native_dtype: bool) -> dict[str, np.ndarray]:
        headers = {"content-type": wire.MSGPACK, wire.HEADER_MODEL: model,
                   wire.HEADER_DTYPE: wire.DTYPE_NATIVE if native_dtype else wire.DTYPE_FLOAT32}
        content = wire.pack_tensors(inputs)
        response = self._connection.request("POST", "/infer", content=content, headers=headers, wait=True)
        try:
            return wire.unpack_tensors(response.content)
        except wire.WireFormatError as exc:
            raise errors.ServerError(f"The server's answer to /infer is not a tensor map ({exc}).") from None


def generation_request(model: str, prompt: str, max_new_tokens: int, temperature: float | None,
                       top_p: float | None, seed: int | None, stop: str | Sequence[str] | None,
                       top_k: int | None, repetition_penalty: float | None,
                       keep_alive: wire.KeepAlive | None = None) -> wire.GenerateRequest:
    """The request of ``POST /generate`` and the first frame of ``/ws/generate``: the same fields
    (``stop`` may be one string)."""
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    return wire.GenerateRequest(model, prompt, max_new_tokens, temperature, top_p, seed, stops, top_k,
                                repetition_penalty, keep_alive)


def _path_segment(name: str) -> str:
    """``name`` escaped for a URL path, slashes kept (hub ids and server paths contain them).

    A ``.`` or ``..`` segment is escaped too, or the URL would be normalised and lose it.
    """
    segments = [quote(part, safe="") for part in name.split("/")]
    return "/".join(part.replace(".", "%2E") if part in (".", "..") else part for part in segments)
