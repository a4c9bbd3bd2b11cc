"""The server process: SIGTERM stops it within seconds whatever it is doing, and a run that ends
without stopping (os._exit in user code, a segfault, kill -9) is reported by the next start."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import psutil
import pytest

from kit import REPO_ROOT, MakeServer, ServerProcess, TinyModels, auth
from mymps_magic import Client

STOP_BOUND_S = 15.0
"""Tells "stopped" from "hung": the server forces its exit 10 s after the signal at the latest."""


def wait_until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def jobs(server: ServerProcess) -> list[dict[str, object]]:
    answer = httpx.get(f"{server.url}/jobs", headers=auth(server.token), timeout=30, trust_env=False)
    answer.raise_for_status()
    return list(answer.json()["jobs"])


def running_jobs(server: ServerProcess) -> list[dict[str, object]]:
    return [job for job in jobs(server) if job["state"] == "running"]


def server_log(server: ServerProcess) -> str:
    return (server.home / "server.log").read_text(errors="replace")


def assert_stops_on_sigterm(server: ServerProcess) -> None:
    """SIGTERM, then the process must be gone within the bound and have logged its stop line."""
    assert server.process is not None
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server ignored SIGTERM for {STOP_BOUND_S:g} s:\n{server_log(server)[-3000:]}")
    assert time.monotonic() - started < STOP_BOUND_S
    assert "stopped (SIGTERM)" in server_log(server), server_log(server)[-3000:]
    assert not list(server.home.glob("running-*.json")), "a stop removes the run marker"


def cell_in_background(server: ServerProcess, source: str) -> threading.Thread:
    """Send ``source`` as a cell from a thread whose outcome the test does not wait for."""

    def call() -> None:
        try:
            with Client(port=server.port, token=server.token, timeout=30) as client:
                client.run_cell(source)
        except Exception:
            pass  # cancelled by the stop, or the connection went: the server is what is tested

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


CLIENT_SCRIPT = """
import sys
from mymps_magic import Client
c = Client(port=int(sys.argv[1]), token=sys.argv[2])
c.run_cell(sys.argv[3])
"""


@pytest.fixture
def client_process(make_server: MakeServer) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Client processes a test starts (to stop or kill them as a user's notebook might go)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def start_client(started: list[subprocess.Popen[bytes]], server: ServerProcess, source: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, str(server.port), server.token, source],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    started.append(process)
    return process


USER_CODE_STATES = {
    "busy-loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(1000)",
    "socket-recv": "import socket\na, b = socket.socketpair()\na.recv(1)",
    "swallows-KeyboardInterrupt": (
        "import time\nwhile True:\n    try:\n        time.sleep(1000)\n    except KeyboardInterrupt:\n        pass"
    ),
    "thread-that-never-ends": "import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()",
}


@pytest.mark.slow
@pytest.mark.parametrize("source", USER_CODE_STATES.values(), ids=USER_CODE_STATES.keys())
def test_sigterm_stops_the_server_while_user_code_runs(make_server: MakeServer, source: str) -> None:
    server = make_server()
    caller = cell_in_background(server, source)
    if "Thread(" in source:  # the cell returns at once; its thread keeps running
        caller.join(60)
        assert not caller.is_alive()
    else:
        wait_until(lambda: running_jobs(server), "the cell to run")
    assert_stops_on_sigterm(server)


@pytest.mark.slow
def test_a_clean_stop_exits_0_without_forcing_and_does_not_wait_for_user_threads(make_server: MakeServer) -> None:
    """A thread user code left running (not a daemon) must not turn a clean stop into the
    forced exit (status 1 and a "forcing" line ten seconds later): the process ends at once."""
    server = make_server()
    caller = cell_in_background(server, USER_CODE_STATES["thread-that-never-ends"])
    caller.join(60)
    assert not caller.is_alive()
    assert_stops_on_sigterm(server)
    assert server.stop() == 0
    log = server_log(server)
    assert "forcing" not in log, log[-2000:]
    assert "ending without waiting for threads user code started: Thread-" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("client_state", [signal.SIGSTOP, signal.SIGKILL], ids=["client-not-reading", "client-gone"])
def test_sigterm_stops_the_server_while_a_cell_floods_output_nobody_reads(
    make_server: MakeServer, client_process: list[subprocess.Popen[bytes]], client_state: signal.Signals
) -> None:
    """A client that stopped reading (its process stopped) or went away with a growing backlog."""
    server = make_server()
    client = start_client(client_process, server, "while True:\n    print('x' * 1000)")
    wait_until(lambda: running_jobs(server), "the flood to run")
    client.send_signal(client_state)
    assert server.process is not None
    server_process = psutil.Process(server.process.pid)
    grown = server_process.memory_info().rss + 32 * 2**20
    wait_until(lambda: server_process.memory_info().rss > grown, "a backlog of 32 MiB on the server")
    assert_stops_on_sigterm(server)
    if client_state == signal.SIGSTOP:
        client.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_sigterm_stops_the_server_while_loads_and_generations_are_queued(
    make_server: MakeServer, tiny_models: TinyModels
) -> None:
    """A cell holds the device; two generations and a load wait behind it, each from its own client."""
    server = make_server()
    with Client(port=server.port, token=server.token) as client:
        client.load_model("llama", path=str(tiny_models.text_llama), progress=False)
    cell_in_background(server, "import time\ntime.sleep(1000)")
    wait_until(lambda: running_jobs(server), "the cell to run")

    def in_background(call: Callable[[Client], object]) -> None:
        def target() -> None:
            try:
                with Client(port=server.port, token=server.token, timeout=30) as client:
                    call(client)
            except Exception:
                pass  # cancelled by the stop

        threading.Thread(target=target, daemon=True).start()

    for _ in range(2):
        in_background(lambda c: c.generate("llama", "Once", max_new_tokens=20, temperature=0))
    in_background(lambda c: c.load_model("gpt2", path=str(tiny_models.text_gpt2), progress=False))
    wait_until(lambda: len(jobs(server)) >= 4, "the queue to fill")
    assert_stops_on_sigterm(server)
    log = server_log(server)
    assert log.count("cancelled while queued: the server is shutting down") == 3, log[-3000:]
    assert "(load, model gpt2) cancelled while queued" in log


def test_the_run_marker_is_private_and_names_the_running_job(make_server: MakeServer) -> None:
    server = make_server()
    assert server.process is not None
    marker = server.home / f"running-{server.process.pid}.json"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    cell_in_background(server, "import time\ntime.sleep(1000)")
    wait_until(lambda: running_jobs(server), "the cell to run")
    job = running_jobs(server)[0]
    wait_until(lambda: f"job {job['id']} (cell" in marker.read_text(), "the marker to name the job")
    assert_stops_on_sigterm(server)


def restart(server: ServerProcess) -> str:
    """Start the same server again (same home and port) and return its server.log."""
    server.stop()
    server.start()
    return server_log(server)


@pytest.mark.slow
def test_os_exit_in_user_code_is_logged_and_reported_by_the_next_start(make_server: MakeServer) -> None:
    server = make_server()
    assert server.process is not None
    pid = server.process.pid
    cell_in_background(server, "import os\nos._exit(3)")
    server.process.wait(60)
    log = server_log(server)
    assert "os._exit(3) called in job" in log and "the server process ends now" in log
    log = restart(server)
    line = next(line for line in log.splitlines() if "the previous run" in line)
    assert f"pid {pid}" in line and "ended by os._exit(3) called in job" in line and "(cell, session" in line
    assert "--restore" in line
    assert not (server.home / f"running-{pid}.json").exists(), "the old marker is reported once"


@pytest.mark.slow
def test_a_segfault_writes_its_traceback_to_the_log_and_the_next_start_says_what_ran(make_server: MakeServer) -> None:
    server = make_server()
    assert server.process is not None
    cell_in_background(server, "import ctypes\nctypes.string_at(0)")
    assert server.process.wait(60) != 0
    log = restart(server)
    assert "Fatal Python error: Segmentation fault" in log
    line = next(line for line in log.splitlines() if "the previous run" in line)
    assert "ended without stopping (killed, crashed or os._exit) while running job" in line and "(cell, session" in line


def test_a_kill_while_idle_is_reported_as_idle_and_a_clean_stop_not_at_all(make_server: MakeServer) -> None:
    server = make_server()
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    assert "ended without stopping (killed, crashed or os._exit) while idle" in restart(server)
    log = restart(server)  # restart() stops it cleanly first
    assert log.count("the previous run") == 1


def test_a_marker_of_another_live_server_on_the_same_home_is_left_alone(
    make_server: MakeServer, tmp_path: Path
) -> None:
    first = make_server(home=tmp_path / "shared")
    second = make_server(home=tmp_path / "shared")
    assert first.process is not None and second.process is not None
    assert (first.home / f"running-{first.process.pid}.json").exists()
    assert "the previous run" not in server_log(second)
