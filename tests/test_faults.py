"""Faults a user meets (issue 16, item 3) that the earlier fault tests do not already cover.

A connection cut by `proxy.Proxy` (a real TCP proxy on loopback, as a dropped tunnel) in the
middle of a generation on either generation endpoint; user code that asks for more memory than
there is; and the server process killed with SIGKILL in the middle of a call, then started again
with ``--restore``. What the user would check each time: the answer (or the one-line error), the
device free again, the models still loaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kit import MakeServer, ServerProcess, TinyModels, never_ending_copy, wait_for
from proxy import Proxy, in_background
from test_session_bad_input import RawSession
from websockets.exceptions import ConnectionClosed

from mymps_magic import Client, wire
from mymps_magic.errors import ConnectionError, RemoteError, SessionLostError

PROMPT = "Machine learning"


@pytest.fixture(scope="module")
def endless(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama that never samples its end: a generation of N tokens runs N steps."""
    return never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("endless") / "llama")


@pytest.fixture(scope="module")
def model(server: ServerProcess, endless: Path) -> Iterator[str]:
    with Client(port=server.port, token=server.token) as direct:
        direct.load_model("faults-endless", path=str(endless), progress=False)
        yield "faults-endless"
        direct.unload_model("faults-endless")


@pytest.fixture
def direct(server: ServerProcess) -> Iterator[Client]:
    """A client that reaches the server without the proxy: it watches /jobs and checks the device."""
    with Client(port=server.port, token=server.token) as client:
        yield client


def running_generation(client: Client, model: str) -> dict[str, Any] | None:
    return next((job for job in client.jobs() if job["model"] == model and job["state"] == "running"), None)


def assert_device_free(client: Client, model: str) -> None:
    """The cut generation is gone from /jobs, the model is loaded, and a short one runs at once."""
    wait_for(lambda: not client.jobs(), "the cut generation gone from /jobs", timeout=10)
    assert model in [m["name"] for m in client.models()]
    assert client.generate(model, PROMPT, max_new_tokens=3, temperature=0)["tokens_generated"] == 3


def test_a_generate_cut_by_the_link_is_cancelled_and_the_device_freed(
        server: ServerProcess, model: str, direct: Client) -> None:
    """`POST /generate` through the proxy, cut while it runs: the caller gets one line, the job
    is cancelled rather than left running its 8192 tokens."""
    with Proxy(server.port) as link, Client(port=link.port, token=server.token) as proxied:
        thread, out = in_background(lambda: proxied.generate(model, PROMPT, max_new_tokens=8192, temperature=0))
        wait_for(lambda: running_generation(direct, model), "the generation running")
        link.sever()
        thread.join(30)
    assert not thread.is_alive() and isinstance(out[0], ConnectionError), out
    assert "\n" not in str(out[0])
    assert_device_free(direct, model)


def test_a_stream_cut_by_the_link_is_cancelled_and_the_device_freed(
        server: ServerProcess, model: str, direct: Client) -> None:
    """`/ws/generate` through the proxy, cut after its first pieces: iterating raises one line,
    and the generation stops on the server."""
    with Proxy(server.port) as link, Client(port=link.port, token=server.token) as proxied:
        pieces: list[str] = []
        with pytest.raises(ConnectionError) as info:
            for piece in proxied.stream_generate(model, PROMPT, max_new_tokens=8192, temperature=0):
                pieces.append(piece)
                if len(pieces) == 3:
                    link.sever()
    assert len(pieces) >= 3 and "\n" not in str(info.value)
    assert_device_free(direct, model)


def test_a_link_cut_while_the_session_first_connects_is_tried_again(server: ServerProcess) -> None:
    """The tunnel answers and drops the connection as the session says its first hello (the
    load benchmark's cuts found it): the first call waits for the link as later ones do, instead
    of failing while the link is back a moment later."""
    with Proxy(server.port) as link, Client(port=link.port, token=server.token) as client:
        link.refusing.set()
        thread, out = in_background(lambda: client.push(x=1))
        wait_for(lambda: link.refused, "the first connection cut")
        link.refusing.clear()
        thread.join(30)
        assert out == [None]
        assert client.pull("x") == 1


def test_a_first_call_to_a_port_nobody_listens_on_fails_at_once(server: ServerProcess) -> None:
    """Nothing to wait for there: one line at once, as before."""
    with Proxy(server.port) as link:
        port = link.port
    with Client(port=port, token=server.token) as client, pytest.raises(ConnectionError) as info:
        client.push(x=1)
    assert "Cannot reach" in str(info.value) and "\n" not in str(info.value)


def allocate_a_petabyte() -> bytearray:
    return bytearray(1 << 50)


def allocate_a_huge_tensor() -> Any:
    import torch

    return torch.empty(1 << 46, dtype=torch.float32)  # 256 TiB


@pytest.mark.parametrize(("allocate", "ename", "says"), [
    (allocate_a_petabyte, "MemoryError", ""),
    # torch's CPU allocator raises a RuntimeError that says so (cuda's is torch.OutOfMemoryError).
    (allocate_a_huge_tensor, "RuntimeError", "DefaultCPUAllocator: can't allocate memory"),
], ids=["bytearray", "torch"])
def test_user_code_allocating_past_memory_is_a_remote_error_and_the_models_stay(
        direct: Client, model: str, allocate: Callable[[], Any], ename: str, says: str) -> None:
    """Python's ``MemoryError`` or the allocator's out-of-memory error comes back as a
    `RemoteError` naming it; the namespace, the models and the device go on."""
    direct.push(kept=[1, 2, 3])
    with pytest.raises(RemoteError) as info:
        direct.run(allocate)
    assert info.value.ename == ename and says in info.value.evalue, info.value
    assert direct.pull("kept") == [1, 2, 3]
    assert direct.run(sum, [1, 2, 3]) == 6
    assert_device_free(direct, model)


def results_until_closed(raw: RawSession, skip: int) -> dict[int, Any]:
    """The values of the ``result`` frames a connection receives until the server closes it,
    but request ``skip``'s."""
    values: dict[int, Any] = {}
    with pytest.raises(ConnectionClosed):
        while True:
            frame = raw.receive()
            if frame.type == "result" and frame.id != skip:
                values[frame.id] = wire.loads(frame.buffers)
    return values


def test_two_connections_on_one_session_never_get_each_others_answers(server: ServerProcess) -> None:
    """Connections take one session id in turns, each sending calls before the next takes over
    with them in flight: every answer, on whichever connection it lands, is the value of the
    request with its id, and every request is answered and ran exactly once. (A new connection's hello says it has
    nothing, ``last_seq`` 0, so answers the older one already got are replayed to it: the same
    answers again, never another request's.)"""
    expected: dict[int, str] = {}
    got: dict[int, Any] = {}
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(RawSession(server))
        session = holder.hello()["session"]
        setup = holder.next_id
        holder.value("cell", {"source": "ran = []"})
        for turn in range(6):
            for _ in range(5):
                rid = holder.next_id
                holder.next_id += 1
                expected[rid] = f"turn {turn} request {rid}"
                source = f"import time\nran.append({rid})\ntime.sleep(0.01)\n{expected[rid]!r}"
                holder.send(wire.Frame("cell", rid, {"source": source}))
            newer = stack.enter_context(RawSession(server))
            newer.hello(session=session)
            for rid, value in results_until_closed(holder, setup).items():
                assert value == expected[rid]
                got[rid] = value
            holder = newer
        while len(got) < len(expected):
            frame = holder.receive()
            if frame.type == "result" and frame.id != setup:
                assert wire.loads(frame.buffers) == expected[frame.id]
                got[frame.id] = wire.loads(frame.buffers)
        assert holder.value("cell", {"source": "ran"}) == sorted(expected)  # each request ran once, in order
    assert got == expected


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@pytest.mark.slow
def test_sigkill_mid_call_is_one_line_and_restore_brings_the_models_back(
        make_server: MakeServer, tiny_models: TinyModels) -> None:
    """The server process killed outright while it runs a call (no handler runs): the call ends
    in one line that says the server is gone and what to do; a new server started with
    ``--restore`` has the models again, and the client says its session was lost until reset."""
    server = make_server()
    with Client(port=server.port, token=server.token) as client:
        client.load_model("killed-llama", path=str(tiny_models.text_llama), progress=False)
        client.push(kept=1)
        future = client.submit(sleep_then, 60, "never")
        wait_for(future.running, "the call running")
        assert server.process is not None
        server.process.kill()
        server.process.wait(30)
        error = future.exception(timeout=60)
        assert isinstance(error, SessionLostError), repr(error)
        line = str(error)
        assert "\n" not in line and "mymps serve --restore" in line and "reset()" in line

        server.process = None
        server.options["restore"] = True
        server.start()
        wait_for(lambda: [m["name"] for m in client.models()] == ["killed-llama"], "the model restored")
        with pytest.raises(SessionLostError) as lost:
            client.pull("kept")
        assert "\n" not in str(lost.value)
        client.reset()
        assert client.run(sleep_then, 0, "fresh") == "fresh"
        assert client.generate("killed-llama", PROMPT, max_new_tokens=2, temperature=0)["tokens_generated"] == 2
