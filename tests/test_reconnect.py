"""A dropped connection (issue 4, item 6): calls in flight complete, output is neither lost nor
doubled, and the namespace survives; a session idle past ``--session-idle`` is forgotten.

The client reaches the server through `proxy.Proxy`, a loopback TCP proxy whose `sever` cuts
every connection through it at once, as a dropped SSH tunnel does, and which can refuse new
connections for a while (the tunnel is still down) before it lets them through again.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest
from kit import ServerProcess
from proxy import Proxy, in_background

import mymps_magic._session
from mymps_magic import Client, wire
from mymps_magic.display import OutputSink
from mymps_magic.errors import ConnectionError, RemoteNameError, SessionLostError

PATIENCE_S = 15.0


class StreamRecorder(OutputSink):
    """Our own `OutputSink`: keeps the streamed text instead of printing it."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def stream(self, name: str, text: str, request: int = 0) -> None:
        with self._changed:
            self.chunks.append((name, text))
            self._changed.notify_all()

    def text(self, name: str = "stdout") -> str:
        with self._changed:
            return "".join(t for n, t in self.chunks if n == name)

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + PATIENCE_S
        with self._changed:
            while needle not in "".join(t for n, t in self.chunks if n == "stdout"):
                left = deadline - time.monotonic()
                assert left > 0, f"{needle!r} never arrived"
                self._changed.wait(left)


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i}", flush=True)
        time.sleep(0.05)
    return n


def mark() -> int:
    marks.append("ran")  # type: ignore[name-defined]  # noqa: F821
    return len(marks)  # type: ignore[name-defined]  # noqa: F821


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[Proxy]:
    with Proxy(server.port) as running:
        yield running


@pytest.fixture
def recorder() -> StreamRecorder:
    return StreamRecorder()


@pytest.fixture
def proxied(server: ServerProcess, proxy: Proxy, recorder: StreamRecorder) -> Iterator[Client]:
    """A client that reaches the shared server through the proxy, its output recorded."""
    with Client(host="127.0.0.1", port=proxy.port, token=server.token) as client:
        client.session.sink = recorder
        yield client


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that forgets a disconnected session after one second."""
    with ServerProcess(tmp_path_factory.mktemp("idle-server"), options={"session_idle": 1}) as process:
        yield process


def test_the_proxy_cuts_connections_and_lets_new_ones_through(server: ServerProcess) -> None:
    """The tool first: a sever ends a connection through the proxy, the next one works."""
    with Proxy(server.port) as proxy:
        first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        first.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(12) == b"HTTP/1.1 200"
        proxy.sever()
        while first.recv(65536):  # the rest of the answer, if any, then the end: no hang
            pass
        first.close()
        with Client(host="127.0.0.1", port=proxy.port, token=server.token) as client:
            assert client.health()["status"] == "ok"
        assert proxy.accepted >= 2


def test_a_cell_survives_a_severed_connection(proxied: Client, proxy: Proxy, recorder: StreamRecorder) -> None:
    proxied.push(marker=41)
    session = proxied.session.session_id
    before = proxy.accepted
    thread, out = in_background(lambda: proxied.run_cell(
        "import time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')\nmarker + 1"))
    recorder.wait_for("before")
    proxy.sever()
    thread.join(PATIENCE_S)
    assert out == [42]
    assert recorder.text() == "before\nafter\n"  # none lost, none twice
    assert proxy.accepted > before  # it did reconnect
    assert proxied.session.session_id == session
    assert proxied.pull("marker") == 41


def test_what_ran_while_disconnected_is_replayed(proxied: Client, proxy: Proxy, recorder: StreamRecorder) -> None:
    """The link stays down until the cell has finished: its output and value wait for the client."""
    proxied.push(marker=1)
    future = proxied.submit(chatty, 10)
    recorder.wait_for("line 0")
    proxy.refusing.set()
    proxy.sever()
    time.sleep(1.5)  # the rest of the output, and the result, are sent while nobody listens
    proxy.refusing.clear()
    assert future.result(timeout=PATIENCE_S) == 10
    assert recorder.text() == "".join(f"line {i}\n" for i in range(10))
    assert proxied.pull("marker") == 1


def test_output_survives_repeated_severs(proxied: Client, proxy: Proxy, recorder: StreamRecorder) -> None:
    thread, out = in_background(lambda: proxied.run(chatty, 40))
    recorder.wait_for("line 0")
    for _ in range(6):
        time.sleep(0.25)
        proxy.sever()
    thread.join(PATIENCE_S)
    assert out == [40]
    assert recorder.text() == "".join(f"line {i}\n" for i in range(40))
    assert proxy.accepted >= 4


def test_requests_sent_while_disconnected_run_once(proxied: Client, proxy: Proxy) -> None:
    proxied.push(marks=[])
    proxy.refusing.set()
    proxy.sever()
    future = proxied.submit(mark)  # sent into a dead socket: resent on reconnect
    pushing, pushed = in_background(lambda: proxied.push(later="here"))
    time.sleep(0.5)
    assert not future.done()
    proxy.refusing.clear()
    assert future.result(timeout=PATIENCE_S) == 1
    pushing.join(PATIENCE_S)
    assert pushed == [None]
    assert proxied.pull("marks", "later") == (["ran"], "here")


def test_a_request_cut_off_as_it_is_sent_runs_once(proxied: Client, proxy: Proxy) -> None:
    proxied.push(marks=[])
    for _ in range(5):
        future = proxied.submit(mark)
        proxy.sever()  # the request may or may not have reached the server
        future.result(timeout=PATIENCE_S)
    assert proxied.pull("marks") == ["ran"] * 5


def test_a_large_push_survives_a_link_that_is_down_when_it_starts(proxied: Client, proxy: Proxy) -> None:
    """A large value goes as an HTTP upload before its request: that is retried too."""
    big = np.arange(3 * wire.CHUNK // 4, dtype=np.float32)  # over CHUNK: sent as an upload
    proxy.refusing.set()
    proxy.sever()
    pushing, pushed = in_background(lambda: proxied.push(big=big))
    time.sleep(0.5)
    assert pushing.is_alive()
    proxy.refusing.clear()
    pushing.join(PATIENCE_S)
    assert pushed == [None]
    np.testing.assert_array_equal(proxied.pull("big"), big)


def test_the_session_survives_a_sever_while_idle(proxied: Client, proxy: Proxy) -> None:
    proxied.push(x=[1, 2, 3])
    session = proxied.session.session_id
    proxy.sever()
    assert proxied.pull("x") == [1, 2, 3]
    assert proxied.run(sleep_then, 0, "ok") == "ok"
    assert proxied.session.session_id == session


def test_a_link_that_never_comes_back_fails_the_calls(
    proxied: Client, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mymps_magic._session, "RECONNECT_WINDOW", 1.0)
    future = proxied.submit(sleep_then, 0.5, "never seen")
    proxy.refusing.set()
    proxy.sever()
    error = future.exception(timeout=PATIENCE_S)
    assert isinstance(error, ConnectionError)
    assert "reconnect" in str(error) and "\n" not in str(error)


@pytest.mark.slow
def test_an_idle_session_is_forgotten(idle_server: ServerProcess) -> None:
    with Proxy(idle_server.port) as proxy, Client(host="127.0.0.1", port=proxy.port, token=idle_server.token) as client:
        client.session.sink = StreamRecorder()
        client.push(v=1)
        session = client.session.session_id
        future = client.submit(sleep_then, 0.3, "lost")
        proxy.refusing.set()
        proxy.sever()
        time.sleep(3.0)  # well past --session-idle 1, and the call has ended meanwhile
        proxy.refusing.clear()
        error = future.exception(timeout=PATIENCE_S)
        assert isinstance(error, SessionLostError)
        assert "\n" not in str(error) and "reset()" in str(error)
        assert_lost_until_reset(client)
        assert client.session.session_id != session


@pytest.mark.slow
def test_a_disconnected_session_with_work_running_is_kept(idle_server: ServerProcess) -> None:
    with Proxy(idle_server.port) as proxy, Client(host="127.0.0.1", port=proxy.port, token=idle_server.token) as client:
        client.session.sink = StreamRecorder()
        client.push(v=1)
        session = client.session.session_id
        future = client.submit(sleep_then, 5.0, "kept")
        deadline = time.monotonic() + PATIENCE_S
        while not future.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proxy.refusing.set()
        proxy.sever()
        # Past --session-idle 1 while the call still runs; the client's backoff brings it back
        # within about 4 s of the sever, before the call ends.
        time.sleep(2.0)
        proxy.refusing.clear()
        assert future.result(timeout=PATIENCE_S) == "kept"
        assert client.session.session_id == session
        assert client.pull("v") == 1


@pytest.mark.slow
def test_a_restarted_server_loses_the_session(make_server: Any) -> None:
    restarted = make_server()
    with Proxy(restarted.port) as proxy, Client(host="127.0.0.1", port=proxy.port, token=restarted.token) as client:
        client.session.sink = StreamRecorder()
        client.push(v=1)
        restarted.stop()
        future = client.submit(sleep_then, 0, "lost")  # sent while the server is down
        restarted.start()
        error = future.exception(timeout=PATIENCE_S)
        assert isinstance(error, SessionLostError)
        assert_lost_until_reset(client)


def assert_lost_until_reset(client: Client) -> None:
    """Every session call says the session is lost until `reset` acknowledges it; then the
    client goes on in a fresh, empty namespace (never silently)."""
    for call in (lambda: client.pull("v"), lambda: client.run_cell("2 + 2"), lambda: client.push(w=1),
                 lambda: client.run(sleep_then, 0, "x"), lambda: client.submit(sleep_then, 0, "x")):
        with pytest.raises(SessionLostError):
            call()
    client.reset()
    with pytest.raises(RemoteNameError):
        client.pull("v")
    assert client.run_cell("2 + 2") == 4


@pytest.mark.slow
def test_an_idle_client_is_told_on_every_call_after_a_restart(make_server: Any) -> None:
    restarted = make_server()
    with Client(host="127.0.0.1", port=restarted.port, token=restarted.token) as client:
        client.session.sink = StreamRecorder()
        client.push(v=1)
        restarted.stop()
        restarted.start()
        assert_lost_until_reset(client)


@pytest.mark.slow
def test_a_call_running_at_a_restart_is_told_and_so_is_every_call_after(make_server: Any) -> None:
    restarted = make_server()
    with Client(host="127.0.0.1", port=restarted.port, token=restarted.token) as client:
        client.session.sink = StreamRecorder()
        client.push(v=1)
        future = client.submit(sleep_then, 30, "never")
        deadline = time.monotonic() + PATIENCE_S
        while not future.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        restarted.stop()
        restarted.start()
        error = future.exception(timeout=PATIENCE_S)
        # The call was stopped by the shutdown (and says so), or found lost on the reconnect.
        assert isinstance(error, SessionLostError) or "shutting down" in str(error), repr(error)
        assert_lost_until_reset(client)


def echo(value: Any) -> Any:
    print("echo", value)
    return value


@pytest.mark.slow
def test_threads_mixing_every_kind_of_call_across_repeated_severs(
        proxied: Client, proxy: Proxy, recorder: StreamRecorder) -> None:
    """Four threads share one client for 10 s (run, cells with output, push and pull, futures,
    large values sent as uploads) while the link is cut every half second or so: every call
    gets its own answer, and none hangs."""
    failures: list[str] = []
    done = threading.Event()

    def work(k: int) -> None:
        rng = random.Random(k)
        n = 0
        try:
            while not done.is_set():
                kind = rng.choice(["run", "cell", "push", "submit", "large"])
                if kind == "run":
                    assert proxied.run(echo, n) == n
                elif kind == "cell":
                    assert proxied.run_cell(f"print('x' * {rng.randint(1, 5000)}); {n}") == n
                elif kind == "push":
                    proxied.push(**{f"v{k}": n})
                    assert proxied.pull(f"v{k}") == n
                elif kind == "submit":
                    futures = [proxied.submit(echo, i) for i in range(5)]
                    assert [f.result(timeout=PATIENCE_S) for f in futures] == list(range(5))
                elif rng.random() < 0.2:
                    big = np.full(rng.randint(2, 3) * wire.CHUNK // 4, n, dtype=np.float32)
                    proxied.push(**{f"big{k}": big})
                    np.testing.assert_array_equal(proxied.pull(f"big{k}"), big)
                n += 1
        except BaseException as exc:  # noqa: BLE001  (reported below, with the thread's number)
            failures.append(f"thread {k} after {n} calls: {exc!r}")

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    severs = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(random.uniform(0.3, 0.8))
        proxy.sever()
        severs += 1
    done.set()
    for thread in threads:
        thread.join(PATIENCE_S * 2)
    assert not [t for t in threads if t.is_alive()], "a call never got its answer"
    assert not failures, failures
    assert severs >= 10 and proxy.accepted > severs  # the link really was cut and reopened
