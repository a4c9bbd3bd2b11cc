"""`mymps serve` supervises the server: a crash of the device process (SIGKILL, ``os._exit`` in
user code, a segfault in user code) brings it back on the same port with the models, and the
client says in one line that its session was lost and why; a clean stop is never undone, and a
crash loop stops with one line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kit import QUIET_ENV, REPO_ROOT, ServerProcess, TinyModels, wait_for
from notebook_kernel import notebook, ok

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


def wait_back(client: Client, restarts: int) -> dict[str, Any]:
    """``/health`` once the server is back from its ``restarts``-th restart, with its model."""
    def back() -> dict[str, Any] | None:
        try:
            health = client.health()
        except Exception:  # the restart is under way: nothing answers yet
            return None
        return health if health["restarts"] == restarts and health["models"] == [MODEL] else None

    return wait_for(back, "the server back with its model")  # type: ignore[no-any-return]


def crash_and_come_back(server: SupervisedServer, crash: Any, cause: str) -> None:
    """Crash the device process with ``crash(client, process)``, then check what a user sees."""
    with Client(port=server.port, token=server.token) as client:
        client.push(kept=1)
        before = client.health()["restarts"]
        old = server.device_process()
        crash(client, old)
        old.wait(60)

        health = wait_back(client, before + 1)
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
    crash_and_come_back(supervised, lambda client, process: process.kill(),
                        "was killed by SIGKILL (kill -9, or the system's out-of-memory killer)")


def exit_2() -> None:
    import os

    os._exit(2)


def test_os_exit_in_user_code(supervised: SupervisedServer) -> None:
    """``os._exit(2)`` from `Client.run`: a crash, though 2 is also the server's status for a
    start that failed (the run marker tells them apart). (A segfault: the notebook's test below.)"""
    def crash(client: Client, process: psutil.Process) -> None:
        with pytest.raises(SessionLostError):  # the call's own answer: the server went with it
            client.run(exit_2)

    crash_and_come_back(supervised, crash, "exited with status 2")


def test_a_notebook_sees_the_cause_in_one_line_and_goes_on_after_reset(
        supervised: SupervisedServer, tmp_path: Path) -> None:
    """A segfault in a cell (``ctypes``): the cell's error and the next cell's are one line each."""
    with notebook(tmp_path, supervised) as nb, Client(port=supervised.port, token=supervised.token) as client:
        ok(nb.execute("%%mymps\nkept = 1"))
        before = client.health()["restarts"]
        crashed = nb.execute("%%mymps\nimport ctypes\nctypes.string_at(0)")
        assert crashed.status == "error" and crashed.error is not None
        assert crashed.error["ename"] in ("SessionLostError", "ServerGoneError")
        wait_back(client, before + 1)
        lost = nb.execute("%%mymps\nkept")
        assert lost.status == "error" and lost.error is not None
        assert lost.error["ename"] == "SessionLostError" and len(lost.error["traceback"]) == 1
        assert "was killed by SIGSEGV" in lost.error["traceback"][0] and "%mymps reset" in lost.error["traceback"][0]
        ok(nb.execute("%mymps reset"))
        assert ok(nb.execute("%%mymps\n6 * 7")).result == {"text/plain": "42"}


def test_a_crash_loop_stops_with_one_line() -> None:
    crashing = [sys.executable, "-c", "import os; os._exit(7)"]
    code = ("import sys; from pathlib import Path; from mymps_magic.cli.supervise import Supervisor; "
            f"sys.exit(Supervisor({crashing!r}, Path('.')).run())")
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


def test_without_the_server_extra_it_says_what_to_install() -> None:
    code = "import sys; sys.modules['torch'] = None; from mymps_magic.cli import main; sys.exit(main(['serve']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**QUIET_ENV, "PATH": ""},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr == ("mymps serve: torch is missing. This needs the server extra: pip install '.[server]' "
                           "(or 'mymps[server]').\n")


def test_a_busy_port_is_one_line_and_no_restart(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mymps_magic.cli", "serve", "--port", str(port), "--home",
                               str(tmp_path)], cwd=REPO_ROOT, env={**QUIET_ENV, "PATH": ""}, capture_output=True,
                              text=True, check=False)
    assert done.returncode == 2 and done.stderr.startswith(f"mymps serve: cannot listen on 127.0.0.1:{port}")
    assert done.stderr.count("\n") == 1


def test_an_unsupervised_server_reports_no_restarts(client: Client) -> None:
    health = client.health()
    assert health["restarts"] == 0 and health["last_crash"] is None


@pytest.mark.parametrize(("stop", "stopped"), [("ctrl-c", "stopped (SIGINT)"), ("hang-up", "stopped (SIGTERM)")])
def test_a_free_port_is_kept_across_restarts_and_a_stop_is_forwarded_once(
        tmp_path: Path, stop: str, stopped: str) -> None:
    """``--port 0``: the restart listens where the first start did. A Ctrl-C at the terminal
    (SIGINT to the foreground process group) reaches the server once, through the supervisor: a
    clean stop, status 0, no restart; a hang-up (the terminal closed) stops it as SIGTERM does."""
    log = tmp_path / "out.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mymps_magic.cli", "serve", "--port", "0", "--home", str(tmp_path / "home"),
             "--device", "cpu"], cwd=REPO_ROOT, env={**env, **QUIET_ENV}, stdout=out, stderr=out,
            start_new_session=True)  # its own process group, as a terminal's foreground job has
    try:
        def addresses() -> list[str]:
            return re.findall(r"mymps server \S+ on (http://\S+), device", log.read_text())

        first = wait_for(addresses, "the first start")[0]
        child = psutil.Process(process.pid).children()[0]
        child.kill()
        assert wait_for(lambda: len(addresses()) == 2 and addresses(), "the restart")[1] == first
        wait_for(lambda: "(restart 1): the server process" in log.read_text(), "the restarted server's line naming the crash")
        restarted = psutil.Process(process.pid).children()[0]
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGHUP)
        assert process.wait(60) == 0
        restarted.wait(60)  # not our child: psutil waits for it to go
        text = log.read_text()
        assert len(addresses()) == 2 and stopped in text and "forcing" not in text
    finally:
        if process.poll() is None:
            process.kill()
