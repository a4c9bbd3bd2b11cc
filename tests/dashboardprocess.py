"""`DashboardProcess`: the real ``python -m mymps_magic.dashboard`` on a free loopback port,
pointed at a test server, started, waited for and stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from kit import QUIET_ENV, REPO_ROOT
from mymps_magic.cli.localserver import free_port

START_TIMEOUT_S = 60.0


class DashboardProcess:
    """The dashboard as a user starts it, with the server's token in its environment only.

    Args:
        server_port: the accelerator server's port.
        token: the server's token (the browser never sees it).
        home: a ``MYMPS_HOME`` of its own, so no user token file is read.
    """

    def __init__(self, server_port: int, token: str, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "dashboard.log"
        env = {**os.environ, **QUIET_ENV, "MYMPS_HOME": str(home), "MYMPS_TOKEN": token}
        command = [sys.executable, "-m", "mymps_magic.dashboard", "--port", str(self.port),
                   "--server-port", str(server_port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> DashboardProcess:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dashboard exited: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/static/dashboard.css", timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the dashboard did not answer in {START_TIMEOUT_S} s: {self.log_path.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> DashboardProcess:
        return self.wait()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
