"""`Client`: the notebook's handle on one mymps server.

Every method is a plain blocking call, safe inside a Jupyter kernel whose event loop is already
running (nothing here calls ``asyncio.run``). The HTTP connection is kept alive across calls.
`stream_generate` returns a `TokenStream`, a plain iterator and the original's async one.

`Client` declares every public method and its promises (the text ones, ``generate``,
``stream_generate`` and ``chat``, in its base `TextCalls`, ``_textcalls.py``), and delegates to
two parts: `RestCalls` (``_rest.py``, the HTTP endpoints) and `SessionExecution`
(``_execution.py``, code run in the remote session over ``/ws/session``), which share one
`Connection`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from mymps_magic._connection import Connection
from mymps_magic._execution import SessionExecution
from mymps_magic._rest import RestCalls
from mymps_magic._settings import Settings
from mymps_magic._textcalls import TextCalls
from mymps_magic.wire import KeepAlive, ProgressEvent

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

    from mymps_magic._cellfuture import CellFuture
    from mymps_magic._futures import RemoteFuture
    from mymps_magic._session import SessionChannel
    from mymps_magic.display import RemoteValue
    from mymps_magic.panel import Panel

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TIMEOUT = 30.0


class Client(TextCalls):
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

    def __init__(self, host: str | None = None, port: int | None = None, *, token: str | None = None,
                 token_file: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.settings = Settings.resolve(host, port, token, token_file=token_file)
        self._connection = Connection(self.settings, timeout)
        self._rest = RestCalls(self._connection)
        self._execution = SessionExecution(self._connection)

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
        self._execution.close()
        self._connection.close()

    # Server and device.

    def health(self) -> dict[str, Any]:
        """The server's status, versions, device and loaded model names. Needs no token.

        Returns:
            ``{"status": "ok", "version", "protocol", "python", "torch", "device" ("mps", "cuda"
            or "cpu"), "device_name", "models": [name, ...], ...}`` and the original's keys
            (``mps_available``, ``mps_built``, ``torch_version``, ``models_loaded``: a count).

        Raises:
            ConnectionError: the server cannot be reached (tunnel down, server not started).
        """
        return self._rest.health()

    def stats(self) -> dict[str, Any]:
        """CPU, RAM and device memory (bytes), and how many jobs run and wait.

        Returns:
            ``{"cpu_percent", "ram": {"used", "total"}, "device": {"kind", "name",
            "allocated", "driver", "total"}, "jobs": {"running", "queued"}}``.

        Raises:
            AuthError: the token is missing or wrong.
        """
        return self._rest.stats()

    def jobs(self) -> list[dict[str, Any]]:
        """The running and queued jobs, each ``{"id", "kind", "session", "model", "state", ...}``.

        Raises:
            AuthError: the token is missing or wrong.
        """
        return self._rest.jobs()

    def panel(self, interval: float = 5.0) -> Panel:
        """A live panel of this server for the notebook: memory, models, jobs, with buttons.

        It refreshes itself every ``interval`` seconds on a thread, through connections of its
        own (this client's session is left alone), until ``panel.close()``.

        Args:
            interval: seconds between refreshes.

        Returns:
            A `mymps_magic.panel.Panel` (an ipywidgets ``VBox``); display it, or let it be the
            cell's value.

        Raises:
            BadRequestError: ``interval`` is not a positive number.
        """
        from mymps_magic.panel import Panel

        settings = self.settings
        return Panel(lambda: Client(settings.host, settings.port, token=settings.token), interval)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one is dropped, a running generation stops at its next token.

        Args:
            job_id: an ``id`` from `jobs`.

        Returns:
            ``{"status": "ok", "id", "cancelled": True}``.

        Raises:
            NotFoundError: no such job (it may have finished already).
        """
        return self._rest.cancel(job_id)

    # Models.

    def models(self) -> list[dict[str, Any]]:
        """The loaded models, each ``{"name", "kind", "dtype", "device", "parameters", "bytes",
        "loaded_at", "last_used"}`` (times in unix seconds).

        Raises:
            AuthError: the token is missing or wrong.
        """
        return self._rest.models()

    def load_model(self, name: str, kind: str | None = None, dtype: str = "auto", *, path: str | None = None,
                   model_class: str | None = None, trust_remote_code: bool = False,
                   progress: bool | Callable[[ProgressEvent], None] = True,
                   keep_alive: KeepAlive | None = None) -> dict[str, Any]:
        """Load a model onto the server's device, where it stays until unloaded (or its
        ``keep_alive`` runs out).

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
            progress: show a progress bar while the server loads; False for none; or a callable
                that gets each ``ProgressEvent`` (``stage``, ``progress`` 0..1, ``message``)
                to show it its own way (the panel's Load form does).
            keep_alive: how long it stays loaded once idle: seconds, -1 forever, 0 unload when
                idle, or a duration such as ``"5m"``; None: the server's ``--keep-alive``
                (forever unless set).

        Returns:
            ``{"status": "ok", "name", "device", "kind", "dtype", "load_time_s",
            "already_loaded"}``, and ``"evicted"``: the idle models unloaded to make room.

        Raises:
            BadRequestError: unknown kind or dtype, or a source the server cannot load.
            NotFoundError: no such model or file.
            ServerError: the load failed on the server; 507 means out of device memory (the
                other models stay loaded).
        """
        return self._rest.load_model(name, kind, dtype, path, model_class, trust_remote_code, progress, keep_alive)

    def unload_model(self, name: str) -> dict[str, Any]:
        """Unload a model and give its device memory back.

        Returns:
            ``{"status": "ok", "name", "freed_bytes"}``.

        Raises:
            NotFoundError: no model of that name is loaded (the message lists the loaded ones).
        """
        return self._rest.unload_model(name)

    def model_info(self, name: str) -> dict[str, Any]:
        """One loaded model's metadata and configuration.

        Returns:
            The `models` fields plus ``"source"``, ``"class"`` and ``"config"``.

        Raises:
            NotFoundError: no model of that name is loaded.
        """
        return self._rest.model_info(name)

    # Work on the device.

    def image(self, model: str, prompt: str, steps: int = 20, *, seed: int | None = None,
              guidance_scale: float | None = None, width: int | None = None, height: int | None = None,
              num_images: int = 1) -> list[Image]:
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
        return self._rest.image(model, prompt, steps, seed, guidance_scale, width, height, num_images)

    def infer(self, model: str, inputs: Mapping[str, Any], *, native_dtype: bool = False) -> dict[str, np.ndarray]:
        """Run a loaded model's forward pass on arrays (the original's ``/infer``).

        Args:
            model: a loaded model's name.
            inputs: keyword arguments of the forward pass, as numpy arrays (or lists).
            native_dtype: floating outputs in the model's dtype, else float32 (as the original).

        Returns:
            The outputs by name: ``output`` for a plain tensor, the field names of a
            ModelOutput or dict, ``output_0``... for a tuple. The arrays are read-only views.

        Raises:
            NotFoundError: the model is not loaded.
            BadRequestError: inputs of the wrong names, shapes or dtypes for the model.
        """
        return self._rest.infer(model, inputs, native_dtype)

    # Code in the remote session.

    @property
    def session(self) -> SessionChannel:
        """The session channel, connected on first use (once, however many threads ask)."""
        return self._execution.session

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the server and return its value.

        Printed output and ``display(...)`` calls show here while it runs. Ctrl-C (the
        notebook's stop button) raises ``KeyboardInterrupt`` in the remote code.

        Raises:
            RemoteError: ``fn`` raised on the server (remote type, message and traceback).
            PicklingError: ``fn``, an argument or the return value cannot be pickled.
            VersionMismatchError: the two ends run different Python or cloudpickle versions.
        """
        return self._execution.run(fn, args, kwargs)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> RemoteFuture:
        """Queue ``fn(*args, **kwargs)`` on the server and return at once.

        Returns:
            A ``concurrent.futures.Future``: ``result(timeout)``, ``done()``, ``cancel()``
            (True only while it is still queued; a running call is stopped with `interrupt`).
            Its ``job_id`` is the id ``/jobs`` shows once it runs. Its output shows under the
            cell that submitted it and stays in ``outputs``; ``display_outputs(wait)`` shows it again.
        """
        return self._execution.submit(fn, args, kwargs)

    def remote(self, fn: F) -> F:
        """Decorator: calling the function runs it on the server (``run``), with the same args."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.run(fn, *args, **kwargs)

        return call  # type: ignore[return-value]

    def push(self, **values: Any) -> None:
        """Set names in the remote namespace: ``c.push(x=arr, y=2)``.

        Raises:
            PicklingError: a value cannot be pickled.
        """
        self._execution.push(values)

    def pull(self, *names: str) -> Any:
        """Get values from the remote namespace: one name returns the value, several a tuple.

        Raises:
            RemoteNameError: a name is not defined remotely.
            PicklingError: a value cannot be pickled (keep it remote; pull plain data).
        """
        return self._execution.pull(names)

    def run_cell(self, source: str, *, timeout: float | None = None) -> Any:
        """Run Python source in the remote namespace, as a notebook cell runs.

        Output shows while it runs; the value of the last expression is returned (a
        `RemoteValue`, which shows the remote rich repr, if the value itself cannot be pickled).

        Args:
            source: the cell's code.
            timeout: seconds after which the remote code is interrupted.

        Raises:
            RemoteError: the cell raised (``KeyboardInterrupt`` after an interrupt or timeout).
        """
        return self._execution.run_cell(source, timeout)

    def run_cell_rich(self, source: str, *, timeout: float | None = None) -> RemoteValue | None:
        """Run a cell as `run_cell` does, but keep the rich repr the server made of its value.

        This is what ``%%mymps`` shows: the notebook displays the returned object through the
        server's mimebundle (an image, a table), whether or not the value could come back.

        Args:
            source: the cell's code.
            timeout: seconds after which the remote code is interrupted.

        Returns:
            The last expression's `RemoteValue`; None when the cell ends without a value.

        Raises:
            RemoteError: the cell raised (``KeyboardInterrupt`` after an interrupt or timeout).
        """
        return self._execution.run_cell_rich(source, timeout)

    def submit_cell(self, source: str, *, timeout: float | None = None) -> CellFuture:
        """Start a cell as `run_cell_rich` does, and return at once (``%%mymps --noblock``).

        Its output is kept, not shown: ``display_outputs()`` shows it where it is called. Later
        calls of this session run after it, in order.

        Args:
            source: the cell's code.
            timeout: seconds after which the remote code is interrupted.

        Returns:
            A `CellFuture`: ``result(timeout)`` is the `RemoteValue` (None without a value) or
            raises the cell's `RemoteError`; ``done()``; ``outputs``; ``display_outputs(wait)``.
        """
        return self._execution.submit_cell(source, timeout)

    def interrupt(self) -> bool:
        """Raise ``KeyboardInterrupt`` in this session's running remote code.

        Returns:
            Whether any of this session's work was running or queued on the server.
        """
        return self._execution.interrupt(self._rest.jobs)

    def reset(self) -> None:
        """Clear the remote namespace. The loaded models stay loaded.

        After a `SessionLostError` (the server restarted, or crashed: `ServerGoneError`) every
        session call raises it again until this is called: then calls go on in a fresh session.
        """
        self._execution.reset()

