"""The client under faults and in plain scripts (issue 10): functions that reach a local module
only from nested code, remote errors outside IPython, token hints that name the real file.

Faults: a message over ``--max-body``, a close that would repeat, a server process that ends.
Scripts run in a fresh interpreter (a subprocess) so that what they import, print and raise is
what a user running ``python script.py`` would see.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from kit import REPO_ROOT, MakeServer, ServerProcess, auth
from mymps_magic import AuthError, BadRequestError, Client, wire
from mymps_magic.errors import CancelledError, ClosedError, ServerGoneError
from test_reconnect import Proxy
from test_session import wait_for_file

SCRIPT_TIMEOUT_S = 120.0
HANG_S = 30.0
"""Tells "hung" from "working" on a busy machine; the calls it bounds take a second or less."""


def run_script(directory: Path, source: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as ``directory/main.py`` (its directory first on the path, as for any
    script), with the repository importable and no ``MYMPS_*`` setting of ours."""
    script = directory / "main.py"
    script.write_text(textwrap.dedent(source))
    environ = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    environ.update(env or {})
    return subprocess.run([sys.executable, str(script), *args], cwd=directory, env=environ,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)


def test_a_local_module_used_only_in_a_comprehension_or_lambda_travels_by_value(
        server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "mylocal.py").write_text("def helper(x):\n    return x * 10\n")
    out = run_script(tmp_path, """
        import sys
        import mylocal
        from mymps_magic import Client

        def in_comprehension(xs):
            return [mylocal.helper(x) for x in xs]

        def in_lambda(xs):
            return list(map(lambda x: mylocal.helper(x), xs))

        with Client(port=int(sys.argv[1]), token=sys.argv[2]) as c:
            print(c.run(in_comprehension, [1, 2]), c.run(in_lambda, [3]))
    """, str(server.port), server.token)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[10, 20] [30]"


def test_a_remote_error_in_a_plain_script_shows_the_remote_frames_and_a_class_that_exists(
        server: ServerProcess, tmp_path: Path) -> None:
    out = run_script(tmp_path, """
        import sys
        import mymps_magic.remote
        from mymps_magic import Client

        def divide(x):
            return x / 0

        with Client(port=int(sys.argv[1]), token=sys.argv[2]) as c:
            try:
                c.run_cell("import json\\njson.loads('{')")
            except mymps_magic.remote.JSONDecodeError as exc:
                print("caught", type(exc).__qualname__, file=sys.stderr)
            c.run(divide, 1)
    """, str(server.port), server.token)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "caught JSONDecodeError"  # the printed path names a class one can catch
    assert lines[-1] == "mymps_magic.remote.ZeroDivisionError: division by zero"
    remote = out.stderr[:out.stderr.index("The above exception")]
    assert f'File "{tmp_path / "main.py"}", line 7, in divide' in remote
    assert "return x / 0" in remote and "ZeroDivisionError: division by zero" in remote


def test_token_hints_name_the_token_file_the_client_reads_and_the_servers_reason(
        server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "elsewhere"
    monkeypatch.delenv("MYMPS_TOKEN", raising=False)
    monkeypatch.delenv("MYMPS_TOKEN_FILE", raising=False)
    monkeypatch.setenv("MYMPS_HOME", str(home))
    with Client(port=server.port) as nothing, pytest.raises(AuthError) as missing:
        nothing.models()
    with Client(port=server.port, token="not-the-token") as wrong:
        with pytest.raises(AuthError) as refused:
            wrong.models()
        with pytest.raises(AuthError) as refused_session:
            wrong.run_cell("1")
    for error in (missing.value, refused.value, refused_session.value):
        line = str(error)
        assert str(home / "token") in line and "~/.mymps" not in line and "\n" not in line
        assert "not-the-token" not in line
    for error in (missing.value, refused.value):  # a refused WebSocket handshake carries no body
        assert "The server says: missing or wrong token" in str(error)  # its own reason, kept


def server_jobs(server: ServerProcess) -> list[Any]:
    answer = httpx.get(f"{server.url}/jobs", headers=auth(server.token), trust_env=False, timeout=HANG_S)
    return list(answer.json()["jobs"])


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn()`` in a thread; the list gets its value or the exception it raised."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_a_push_between_max_body_and_the_upload_threshold_fails_at_once_and_the_session_goes_on(
        make_server: MakeServer) -> None:
    server = make_server(max_body="1MiB")
    with Client(port=server.port, token=server.token, timeout=5) as c:
        c.push(kept=1)
        with pytest.raises(BadRequestError) as larger:  # sent as an upload: the HTTP 413
            c.push(a=np.ones(6_000_000, np.uint8))
        pushing, out = in_background(lambda: c.push(a=np.ones(2_000_000, np.uint8)))
        pushing.join(HANG_S)  # it used to resend forever
        assert not pushing.is_alive(), "the push never ended"
        [error] = out
        assert type(error) is type(larger.value) and error.status_code == larger.value.status_code == 413
        assert "--max-body" in str(error) and "\n" not in str(error)
        assert c.pull("kept") == 1  # the same session, still working
        assert c.run_cell("1 + 1") == 2


def test_a_close_that_would_repeat_shows_the_servers_reason_and_is_not_retried(
        server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    with Proxy(server.port) as proxy, Client(port=proxy.port, token=server.token) as c:
        c.push(kept=1)
        monkeypatch.setattr(wire.frames, "PROTOCOL_VERSION", 99)  # the next hello speaks another protocol
        proxy.sever()
        started = time.monotonic()
        with pytest.raises(ClosedError) as info:
            c.pull("kept")
        line = str(info.value)
        assert "protocol version" in line and "Is the tunnel up" not in line and "\n" not in line
        assert time.monotonic() - started < HANG_S  # no reconnect loop (it used to try for 60 s)
        accepted = proxy.accepted
        with pytest.raises(ClosedError):  # said again, without a new attempt
            c.run_cell("1")
        assert proxy.accepted == accepted


@pytest.mark.slow
def test_user_code_that_ends_the_server_process_is_reported_as_such(make_server: MakeServer) -> None:
    server = make_server()
    with Client(port=server.port, token=server.token) as c:
        c.push(kept=1)
        started = time.monotonic()
        with pytest.raises(ServerGoneError) as info:
            c.run_cell("import os\nos._exit(1)")
        waited = time.monotonic() - started
        line = str(info.value)
        assert "ended while running this call" in line and "mymps serve --restore" in line and "\n" not in line
        assert waited < 30, f"took {waited:.0f} s to say so"  # it used to wait 60 s to blame the tunnel
        with pytest.raises(ServerGoneError):  # and so does every call until the user resets
            c.pull("kept")
        server.process = None  # it is gone: start it again on the same port and home
        server.start()
        c.reset()
        assert c.run_cell("2 + 2") == 4


@pytest.mark.slow
def test_a_link_down_past_the_crash_rule_fails_the_call_but_the_session_resumes(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A tunnel down for longer than the rule that calls a silent server a crash: the call in
    flight is told, but the session is not given up, so the next call finds the namespace."""
    go = tmp_path / "go"
    with Proxy(server.port) as link, Client(port=link.port, token=server.token) as c:
        c.push(kept=41)
        thread, out = in_background(lambda: c.run_cell(
            f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)"))
        deadline = time.monotonic() + HANG_S
        while not server_jobs(server):
            assert time.monotonic() < deadline, "the cell never started"
            time.sleep(0.05)
        link.refusing.set()
        link.sever()
        thread.join(HANG_S)
        assert not thread.is_alive() and isinstance(out[0], ServerGoneError), out
        with pytest.raises(ServerGoneError):  # still nothing answers: said again at once
            c.pull("kept")
        link.refusing.clear()
        go.touch()
        assert c.run_cell("kept + 1") == 42  # the same session, its namespace kept


def test_a_session_taken_over_says_so_and_does_not_take_it_back(server: ServerProcess) -> None:
    from websockets.sync.client import connect

    with Client(port=server.port, token=server.token) as c:
        c.push(kept=1)
        hello = wire.Frame("hello", 0, {"session": c.session.session_id, "last_seq": 0, "python": wire.PYTHON_VERSION,
                                        "cloudpickle": wire.cloudpickle_version(), "protocol": wire.PROTOCOL_VERSION})
        with connect(server.ws_url("/ws/session"), additional_headers={"Authorization": f"Bearer {server.token}"},
                     proxy=None) as other:
            for message in wire.encode_frame(hello):
                other.send(bytes(message))
            welcome = wire.FrameDecoder().feed(other.recv(timeout=HANG_S))
            assert welcome is not None and welcome["resumed"]
            started = time.monotonic()
            with pytest.raises(ClosedError) as info:
                c.pull("kept")
            assert "taken over by another connection" in str(info.value) and "\n" not in str(info.value)
            assert time.monotonic() - started < HANG_S
            with pytest.raises(ClosedError):  # said again: the old client does not reattach
                c.run_cell("1")
            pull = wire.Frame("pull", 1000, {"names": ["kept"], "ack": 0})  # ids go on increasing
            for message in wire.encode_frame(pull):
                other.send(bytes(message))
            decoder = wire.FrameDecoder()
            while (answer := decoder.feed(other.recv(timeout=HANG_S))) is None or answer.id != pull.id:
                pass  # what the session replays first
            assert answer.type == "result"  # the session stays with the newer socket
            assert list(wire.loads(answer.buffers)) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("buffer", ["1MiB", "256KiB"])
def test_a_client_that_reads_gets_all_output_of_a_cell_printing_past_the_session_buffer(
    make_server: MakeServer, capsys: pytest.CaptureFixture[str], buffer: str
) -> None:
    """The session buffer bounds what a client has not read, not what a cell prints: a client
    that reads acknowledges output as it goes (at least every quarter of the buffer, which the
    welcome announces), and the printing waits for it: a cell printing 40x the buffer or more
    loses nothing, however fast it prints."""
    server = make_server(session_buffer=buffer)
    lines = 40_000
    with Client(server.host, server.port, token=server.token) as c:
        assert c.run_cell(f"for i in range({lines}):\n    print(str(i).rjust(999, 'y'))\n'finished'") == "finished"
    out, err = capsys.readouterr()
    assert "of output dropped" not in out + err
    printed = [line for line in out.splitlines() if line.startswith("y")]
    assert len(printed) == lines and printed[-1].endswith(str(lines - 1))


def test_a_message_over_the_clients_limit_stops_the_session_with_one_line_until_reset(server: ServerProcess) -> None:
    """A result the client will not take (over its WebSocket ``max_size``) would come back on
    every resume; the session stops instead, says why on this and every later call, and a
    ``reset()`` starts a fresh one. Nothing hangs and the reading thread does not die."""
    with Client(port=server.port, token=server.token) as c:
        assert c.run(int, "1") == 1
        channel = c._execution.channel
        assert channel._ws is not None
        channel._ws.max_size = 1 << 20  # as if the server sent over the real 1 GiB limit
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                c.run(bytes, 2 << 20)
            except BaseException as exc:  # whatever ended the call, for the assertions
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(HANG_S)
        assert not caller.is_alive(), "a message over the limit hung the call"
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionError), outcome
        line = str(outcome[0])
        assert "\n" not in line and "limit" in line and "reset()" in line, line
        with pytest.raises(ConnectionError, match="limit"):
            c.run(int, "2")
        c.reset()
        assert c.run(int, "3") == 3


def test_a_queued_call_cancelled_from_outside_the_session_raises_cancelled(server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    """`mymps cancel`, the dashboard or the panel cancel a queued call with DELETE /jobs/ID:
    its future ends with CancelledError naming the job, instead of waiting forever."""
    release = tmp_path / "release"

    def listed(http: httpx.Client) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = http.get("/jobs").json()["jobs"]
        return answer

    with Client(port=server.port, token=server.token) as c, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=auth(server.token)) as http:
        first = c.submit(wait_for_file, str(release), "released")
        second = c.submit(int, "7")
        deadline = time.monotonic() + HANG_S
        queued: list[dict[str, Any]] = []
        while not queued and time.monotonic() < deadline:  # the blocker running, the call behind it
            now = listed(http)
            if any(job["state"] == "running" for job in now):
                queued = [job for job in now if job["state"] == "queued"]
        assert queued, listed(http)
        assert http.delete(f"/jobs/{queued[0]['id']}").status_code == 200
        with pytest.raises(CancelledError, match=queued[0]["id"]):
            second.result(timeout=HANG_S)
        release.touch()
        assert first.result(timeout=HANG_S) == "released"
        assert c.run(int, "8") == 8
