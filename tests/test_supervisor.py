"""`mymps serve` supervises the server: a crash of the device process (SIGKILL, ``os._exit`` in
user code, a segfault in user code) brings it back on the same port with the models, and the
client says in one line that its session was lost and why; a clean stop is never undone, and a
crash loop stops with one line."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from kit import QUIET_ENV, REPO_ROOT, ServerProcess, TinyModels, wait_for

from mymps_magic import Client
from mymps_magic.errors import SessionLostError

pytestmark = pytest.mark.slow

MODEL = "supervised-llama"


class SupervisedServer(ServerProcess):
    """The real ``mymps serve`` (the supervisor) with the test server's options."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "mymps_magic.cli", "serve", *super().command[3:]]

    def device_process(self) -> psutil.Process:
        """The supervisor's child: the server process that holds the device."""
        assert self.process is not None
        children = wait_for(lambda: psutil.Process(self.process.pid).children() if self.process else [],
                            "the supervised server process")
        assert len(children) == 1, children
        return children[0]


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[SupervisedServer]:
    server = SupervisedServer(tmp_path_factory.mktemp("supervised")).start()
    with Client(port=server.port, token=server.token) as client:
        client.load_model(MODEL, path=str(tiny_models.text_llama), progress=False)
    yield server
    server.stop()


def crash_and_come_back(server: SupervisedServer, crash: Any, cause: str) -> None:
    """Crash the device process with ``crash(client, process)``, then check what a user sees."""
    with Client(port=server.port, token=server.token) as client:
        client.push(kept=1)
        before = client.health()["restarts"]
        old = server.device_process()
        crash(client, old)
        old.wait(60)

        def back() -> dict[str, Any] | None:
            try:
                health = client.health()
            except Exception:  # the restart is under way: nothing answers yet
                return None
            return health if health["restarts"] == before + 1 and health["models"] == [MODEL] else None

        health = wait_for(back, "the server back with its model")
        assert cause in health["last_crash"] and str(old.pid) in health["last_crash"]
        assert server.device_process().pid != old.pid and server.running
        with pytest.raises(SessionLostError) as lost:
            client.pull("kept")
        line = str(lost.value)
        assert "\n" not in line and cause in line and "reset()" in line
        client.reset()
        assert client.run(sum, [1, 2, 3]) == 6
        assert client.run_cell("x = 20\nx + 1") == 21
        assert client.generate(MODEL, "hello", max_new_tokens=2, temperature=0)["tokens_generated"] == 2


def test_sigkill_of_the_device_process(supervised: SupervisedServer) -> None:
    crash_and_come_back(supervised, lambda client, process: process.kill(), "was killed by SIGKILL")


def exit_now() -> None:
    import os

    os._exit(3)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


@pytest.mark.parametrize(("code", "cause"), [(exit_now, "exited with status 3"), (segfault, "was killed by SIGSEGV")])
def test_a_crash_in_user_code(supervised: SupervisedServer, code: Any, cause: str) -> None:
    def crash(client: Client, process: psutil.Process) -> None:
        with pytest.raises(SessionLostError):  # the call's own answer: the server went with it
            client.run(code)

    crash_and_come_back(supervised, crash, cause)


def test_a_crash_loop_stops_with_one_line() -> None:
    crashing = [sys.executable, "-c", "import os; os._exit(7)"]
    code = f"import sys; from mymps_magic.cli.supervise import Supervisor; sys.exit(Supervisor({crashing!r}).run())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**QUIET_ENV, "PATH": ""},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 5 and all("exited with status 7" in line for line in lines)
    assert "5 crashes in 60 s" in lines[-1] and "mymps serve --restore" in lines[-1]


def test_a_bad_option_is_one_line_and_no_supervision() -> None:
    done = subprocess.run([sys.executable, "-m", "mymps_magic.cli", "serve", "--port", "70000"], cwd=REPO_ROOT,
                          env={**QUIET_ENV, "PATH": ""}, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip() == "mymps serve: --port: 70000 is not a TCP port (0-65535)"


def test_an_unsupervised_server_reports_no_restarts(client: Client) -> None:
    health = client.health()
    assert health["restarts"] == 0 and health["last_crash"] is None


def test_a_stop_is_forwarded_once_and_never_undone(supervised: SupervisedServer) -> None:
    """SIGINT (a Ctrl-C at the terminal) reaches the server once, through the supervisor: a clean
    stop with status 0, and no restart. (Last here: it stops the module's server.)"""
    child = supervised.device_process()
    assert supervised.process is not None
    supervised.process.send_signal(signal.SIGINT)
    assert supervised.process.wait(60) == 0
    child.wait(60)  # not our child: psutil waits for it to go, without its status
    assert not child.is_running()
