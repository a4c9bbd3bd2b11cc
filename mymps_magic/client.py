"""`Client`: the notebook's handle on one mymps server.

Every method is a plain blocking call, safe inside a Jupyter kernel whose event loop is already
running (nothing here calls ``asyncio.run``). The HTTP connection is kept alive across calls.
Streams are the one exception to "plain": `stream_generate` returns a `TokenStream`, which is
also the original client's async iterator.
"""

from __future__ import annotations

import base64
import io
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import quote

from mymps_magic import errors, wire
from mymps_magic._connection import Connection
from mymps_magic._remote import RemoteExecution
from mymps_magic._settings import Settings
from mymps_magic._stream import TokenStream

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

DEFAULT_TIMEOUT = 30.0


class Client(RemoteExecution):
    """A connection to a mymps server, usually through the SSH tunnel on localhost.

    Example:
        >>> c = Client()                                    # doctest: +SKIP
        >>> c.load_model("microsoft/phi-2")                 # doctest: +SKIP
        >>> c.generate("microsoft/phi-2", "Hello")["text"]  # doctest: +SKIP

    Args:
        host: the server's host; else ``MYMPS_SERVER_HOST``, else ``127.0.0.1``.
        port: its port; else ``MYMPS_SERVER_PORT``, else ``MYMPS_PORT``, else ``5555``.
        token: the server's token; else ``MYMPS_TOKEN``, else the file ``MYMPS_TOKEN_FILE``,
            else ``$MYMPS_HOME/token`` (``~/.mymps/token``). Prefer the environment or the
            file: a token passed here sits in the notebook's history.
        token_file: a file holding the token, read instead of the environment (it must
            exist); error hints name it.
        timeout: seconds to wait for a short call (health, stats, models, jobs, info, unload).
            Generation, images, inference and loading wait as long as the work takes; only
            their connection attempt is bounded.

    Attributes:
        settings: the address and token in use (the token is left out of its repr).

    Raises:
        BadRequestError: a port that is not a port number, in the argument or the environment.
        AuthError: the token file exists but cannot be read, or ``token_file`` does not exist.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__()
        self.settings = Settings.resolve(host, port, token, token_file=token_file)
        self._connection = Connection(self.settings, timeout)

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    def __repr__(self) -> str:
        return f"Client({self.settings.address!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections. Models stay loaded on the server; a session's namespace is
        kept for ``--session-idle`` seconds."""
        self._close_session()
        self._connection.close()

    # Server and device.

    def health(self) -> dict[str, Any]:
        """The server's status, versions, device and loaded model names. Needs no token.

        Returns:
            ``{"status": "ok", "version", "protocol", "python", "torch", "device",
            "device_name", "models": [name, ...]}``.

        Raises:
            ConnectionError: the server cannot be reached (tunnel down, server not started).
        """
        return self._connection.json("GET", "/health")

    def stats(self) -> dict[str, Any]:
        """CPU, RAM and device memory (bytes), and how many jobs run and wait.

        Returns:
            ``{"cpu_percent", "ram": {"used", "total"}, "device": {"kind", "name",
            "allocated", "driver", "total"}, "jobs": {"running", "queued"}}``.

        Raises:
            AuthError: the token is missing or wrong.
        """
        return self._connection.json("GET", "/stats")

    def jobs(self) -> list[dict[str, Any]]:
        """The running and queued jobs, each ``{"id", "kind", "session", "model", "state", ...}``.

        Raises:
            AuthError: the token is missing or wrong.
        """
        return list(self._connection.json("GET", "/jobs")["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one is dropped, a running generation stops at its next token.

        Args:
            job_id: an ``id`` from `jobs`.

        Returns:
            ``{"status": "ok", "id", "cancelled": True}``.

        Raises:
            NotFoundError: no such job (it may have finished already).
        """
        return self._connection.json("DELETE", f"/jobs/{_path_segment(job_id)}")

    # Models.

    def models(self) -> list[dict[str, Any]]:
        """The loaded models, each ``{"name", "kind", "dtype", "device", "parameters", "bytes",
        "loaded_at", "last_used"}`` (times in unix seconds).

        Raises:
            AuthError: the token is missing or wrong.
        """
        return list(self._connection.json("GET", "/models")["models"])

    def load_model(
        self,
        name: str,
        kind: str | None = None,
        dtype: str = "auto",
        *,
        path: str | None = None,
        model_class: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Load a model onto the server's device, where it stays until unloaded.

        Loading a name that is already loaded does nothing and says so (``already_loaded``).

        Args:
            name: a hub id or a path on the server; the name later calls use.
            kind: ``text``, ``diffusion``, ``auto``, ``torchscript`` or ``checkpoint``; ``None``
                lets the server find it from what the name or path holds.
            dtype: ``auto`` (float16 on mps/cuda, float32 on cpu), ``float32``, ``float16``
                or ``bfloat16``.
            path: load from this source (hub id or server path) under ``name``.
            model_class: for ``checkpoint``: ``"package.module:ClassName"``, importable on the
                server and constructed without arguments.
            trust_remote_code: let transformers run the model repository's own code.
            progress: show a progress bar while the server loads.

        Returns:
            ``{"status": "ok", "name", "device", "kind", "dtype", "load_time_s",
            "already_loaded"}``.

        Raises:
            BadRequestError: unknown kind or dtype, or a source the server cannot load.
            NotFoundError: no such model or file.
            ServerError: the load failed on the server; 507 means out of device memory (the
                other models stay loaded).
        """
        body: dict[str, Any] = {"name": name, "kind": kind, "dtype": dtype, "trust_remote_code": trust_remote_code}
        if path is not None:
            body["path"] = path
        if model_class is not None:
            body["model_class"] = model_class
        if not progress:
            return self._connection.json("POST", "/models/load", json_body=body, wait=True)
        return self._load_with_progress(body)

    def _load_with_progress(self, body: dict[str, Any]) -> dict[str, Any]:
        from tqdm.auto import tqdm

        # The bar appears with the first progress event, so that a request the server rejects
        # at once (bad kind, unknown path) prints only its error.
        bar: tqdm[Any] | None = None
        final: dict[str, Any] | None = None
        try:
            for event in self._connection.ndjson("POST", "/models/load", json_body=body):
                if event.get("event") != wire.EVENT_PROGRESS:
                    final = event
                    continue
                if bar is None:
                    bar = tqdm(total=100, desc=f"Loading {body['name']}", bar_format="{l_bar}{bar}| {elapsed}{postfix}")
                bar.set_postfix_str(str(event.get("message") or event.get("stage") or ""), refresh=False)
                bar.update(max(0, round(float(event.get("progress", 0)) * 100) - bar.n))
            if bar is not None and final is not None:
                bar.update(100 - bar.n)
        finally:
            if bar is not None:
                bar.close()
        if final is None:
            raise errors.ServerError("The server ended the load without saying how it went; see its log.")
        return final

    def unload_model(self, name: str) -> dict[str, Any]:
        """Unload a model and give its device memory back.

        Returns:
            ``{"status": "ok", "name", "freed_bytes"}``.

        Raises:
            NotFoundError: no model of that name is loaded (the message lists the loaded ones).
        """
        return self._connection.json("DELETE", f"/models/{_path_segment(name)}")

    def model_info(self, name: str) -> dict[str, Any]:
        """One loaded model's metadata and configuration.

        Returns:
            The `models` fields plus ``"source"``, ``"class"`` and ``"config"``.

        Raises:
            NotFoundError: no model of that name is loaded.
        """
        return self._connection.json("GET", f"/models/{_path_segment(name)}/info")

    # Work on the device.

    def generate(
        self,
        model: str,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 0.9,
        *,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Generate text and return it when done (see `stream_generate` for pieces as they come).

        Args:
            model: a loaded text model's name.
            prompt: the text to continue.
            max_new_tokens: at most this many new tokens (1..8192).
            temperature: sampling temperature (0..10); 0 means greedy.
            top_p: nucleus sampling mass, in (0, 1].
            seed: makes sampling repeatable.
            stop: a string, or strings, that end the generation when produced.

        Returns:
            ``{"text", "tokens_generated", "time_s", "tokens_per_s",
            "stop_reason": "length" | "eos" | "stop" | "cancelled"}``; ``text`` excludes the prompt.

        Raises:
            NotFoundError: the model is not loaded.
            BadRequestError: an argument out of range.
        """
        body = _generation_request(model, prompt, max_new_tokens, temperature, top_p, seed, stop)
        return self._connection.json("POST", "/generate", json_body=body, wait=True)

    def stream_generate(
        self,
        model: str,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 0.9,
        *,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> TokenStream:
        """Generate text and receive it piece by piece.

        Nothing is sent until the stream is used. Use it with ``for piece in ...`` or, as in
        the original client, ``async with ... as s: async for piece in s``. Closing it early
        cancels the generation on the server; afterwards ``stream.stats`` holds the figures.

        Args:
            model, prompt, max_new_tokens, temperature, top_p, seed, stop: as for `generate`.

        Returns:
            A `TokenStream` of text pieces; errors (unknown model, bad argument) are raised
            while iterating it.
        """
        request = _generation_request(model, prompt, max_new_tokens, temperature, top_p, seed, stop)
        return TokenStream(self._connection, request)

    def image(
        self,
        model: str,
        prompt: str,
        steps: int = 20,
        *,
        seed: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
    ) -> list[Image]:
        """Generate images with a loaded diffusion pipeline.

        Args:
            model: a loaded ``diffusion`` model's name.
            prompt: what to draw.
            steps: denoising steps (1..1000).
            seed: makes the images repeatable.
            guidance_scale, width, height: passed to the pipeline; its defaults when None.
            num_images: how many images to make.

        Returns:
            The images, as PIL images.

        Raises:
            NotFoundError: the model is not loaded.
            BadRequestError: an argument out of range, or the model is not a diffusion pipeline.
        """
        body: dict[str, Any] = {"model": model, "prompt": prompt, "steps": steps, "num_images": num_images}
        optional = {"seed": seed, "guidance_scale": guidance_scale, "width": width, "height": height}
        body.update({key: value for key, value in optional.items() if value is not None})
        answer = self._connection.json("POST", "/image", json_body=body, wait=True)

        from PIL import Image as PILImage

        images: list[Image] = []
        for encoded in answer["images"]:
            image = PILImage.open(io.BytesIO(base64.b64decode(encoded)))
            image.load()
            images.append(image)
        return images

    def infer(self, model: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run a loaded model's forward pass on arrays (the original's ``/infer``).

        Args:
            model: a loaded model's name.
            inputs: keyword arguments of the forward pass, as numpy arrays (or lists).

        Returns:
            The outputs by name: ``output`` for a plain tensor, the field names of a
            ModelOutput or dict, ``output_0``... for a tuple. The arrays are read-only views.

        Raises:
            NotFoundError: the model is not loaded.
            BadRequestError: inputs of the wrong names, shapes or dtypes for the model.
        """
        headers = {"content-type": wire.MSGPACK, wire.HEADER_MODEL: model}
        response = self._connection.request("POST", "/infer", content=wire.pack_tensors(inputs), headers=headers, wait=True)
        try:
            return wire.unpack_tensors(response.content)
        except wire.WireFormatError as exc:
            raise errors.ServerError(f"The server's answer to /infer is not a tensor map ({exc}).") from None


MympsClient = Client
"""The original client's name, kept as a true alias so its examples run unchanged."""


def _generation_request(
    model: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: str | Sequence[str] | None,
) -> dict[str, Any]:
    """The body of ``POST /generate`` and the first frame of ``/ws/generate``: the same fields."""
    request: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if seed is not None:
        request["seed"] = seed
    if stop is not None:
        request["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return request


def _path_segment(name: str) -> str:
    """``name`` escaped for a URL path, slashes kept (hub ids and server paths contain them).

    A ``.`` or ``..`` segment is escaped too, or the URL would be normalised and lose it.
    """
    segments = [quote(part, safe="") for part in name.split("/")]
    return "/".join(part.replace(".", "%2E") if part in (".", "..") else part for part in segments)
