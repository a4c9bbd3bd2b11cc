"""The real server as a child process on this machine: ``python -m kernel_server`` on a loopback port.

One launcher for everything that runs a server locally: `mymps demo`, the tests (``tests/kit.py``'s
``ServerProcess`` adds their environment) and the benchmarks. It never imports torch, and it
checks ``GET /health`` with the standard library, so a caller needs nothing of the client to wait
for the server.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from mymps_magic.errors import CommandError

__all__ = ["LocalServer", "ServerStartError", "free_port"]

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

_Server = TypeVar("_Server", bound="LocalServer")


class ServerStartError(CommandError):
    """The local server did not answer ``GET /health``: it exited, or was stopped after the timeout.

    The message is one line that ends with the last line of the server's log, where it says what
    was wrong (its own one-line error, or the last line of a traceback), and names the log file.

    Attributes:
        returncode: the exit status if the process ended by itself, else None (it never answered).
        log: everything the process printed.
    """

    def __init__(self, reason: str, returncode: int | None, log: str, log_path: Path) -> None:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        ending = f"; its log ({log_path}) ends: {lines[-1]}" if lines else f"; its log ({log_path}) is empty"
        super().__init__(reason + ending)
        self.returncode = returncode
        self.log = log


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """``python -m kernel_server --device cpu`` on 127.0.0.1, started, waited for and stopped.

    The process gets a fresh random ``MYMPS_TOKEN`` and its own ``--home``; inherited ``MYMPS_*``
    variables are dropped, because the user's own settings (preloads, a token file, a home) belong
    to their real server. Its stdout and stderr are appended to ``log_path`` across restarts.
    `start` may be called again after `stop` (same home, port and token), which is how a
    ``--restore`` restart is done.

    Args:
        home: the server's ``--home``; created if missing.
        port: the port to listen on; a free one by default.
        options: more command-line options, ``max_body="1KiB"`` -> ``--max-body 1KiB``;
            ``True`` gives a bare flag, ``False``/``None`` omits it, a list or tuple repeats it.
        env: environment variables for the process, applied last (they may override the token).
        token_file: when true, no ``MYMPS_TOKEN`` is given: the server uses its token file
            (created on first start) and `token` is read from ``HOME/token`` once it is up.
        log_path: where its output goes; ``HOME/server-process.log`` by default.
        cwd: its working directory; ours by default.
        own_session: start it in a session of its own, so that a Ctrl-C at the terminal reaches
            only the caller, which then stops the server in order instead of killing it under a
            running request.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        port: int | None = None,
        options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        token_file: bool = False,
        log_path: str | Path | None = None,
        cwd: str | Path | None = None,
        own_session: bool = False,
    ) -> None:
        self.home = Path(home)
        self.port = port if port is not None else free_port()
        self.host = HOST
        self.options = dict(options or {})
        self.extra_env = dict(env or {})
        self.token_file = token_file
        self.token = "" if token_file else secrets.token_hex(24)  # as the server makes them: never a leading "-"
        self.log_path = Path(log_path) if log_path is not None else self.home / "server-process.log"
        self.cwd = cwd
        self.own_session = own_session
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def ws_url(self, path: str = "/ws/generate") -> str:
        """The ``ws://`` address of one of its WebSocket endpoints."""
        return f"ws://{self.host}:{self.port}{path}"

    @property
    def command(self) -> list[str]:
        """The command line that `start` runs."""
        args = [sys.executable, "-m", "kernel_server", "--host", self.host, "--port", str(self.port)]
        args += ["--home", str(self.home), "--device", "cpu"]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    args += [flag, str(item)]
            elif value is not None and value is not False:
                args += [flag, str(value)]
        return args

    def environment(self) -> dict[str, str]:
        """The process environment: ours minus ``MYMPS_*``, the token, then ``env``."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
        if not self.token_file:
            env["MYMPS_TOKEN"] = self.token
        env.update(self.extra_env)
        return env

    def start(self: _Server, timeout: float = START_TIMEOUT_S) -> _Server:
        """Start the process and wait until ``GET /health`` answers 200.

        Returns:
            ``self``, for ``server = LocalServer(home).start()``.

        Raises:
            ServerStartError: the process exited, or did not answer within ``timeout`` seconds
                (it is then stopped), or it is already started.
        """
        if self.process is not None:
            raise ServerStartError(f"the server on port {self.port} is already started; stop it first",
                                   None, "", self.log_path)
        self.home.mkdir(parents=True, exist_ok=True)
        # 0600: the server's output names its models, paths and sessions (as server.log does).
        self._log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_session,
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            returncode = self.process.poll()
            if returncode is not None:
                self._close()
                raise ServerStartError(f"the server exited with status {returncode} before it was up",
                                       returncode, self.log_text(), self.log_path)
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"no answer from {self.url}/health in {timeout:g} s, so it was stopped",
                                       None, self.log_text(), self.log_path)
            time.sleep(0.05)
        if self.token_file:
            self.token = (self.home / "token").read_text().strip()
        return self

    def _healthy(self) -> bool:
        # No proxy handler: a proxy from the environment must never see loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/health", timeout=1.0) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int | None:
        """Stop the process: SIGTERM, then SIGKILL after 10 s. Safe to call twice.

        Returns:
            The exit status, or None if it was not started.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self._close()

    def _close(self) -> int | None:
        assert self.process is not None
        returncode = self.process.returncode
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return returncode

    @property
    def running(self) -> bool:
        """Whether the process is started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the process has printed so far (all starts), or ``""``."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} home={str(self.home)!r} {state}>"
