"""Bad input on the notebook channel ``/ws/session`` (issue 4, item 8).

Each test sends something the real client never would, through `RawSession` (a client built
from the ``wire`` package and a plain ``websockets`` connection), and then checks two things: the server
answered clearly (an error frame for the request, or a close with a code and a reason, never an
abrupt drop), and the server and the session still work afterwards.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from kit import ServerProcess, auth
from mymps_magic import Client, wire
from mymps_magic.errors import BadRequestError, PicklingError

# Close codes a clear refusal may use: policy violation (token), unsupported data, too big.
CLEAR_CLOSE_CODES = (1003, 1008, 1009)
ANSWER_TIMEOUT_S = 10.0


def raw_header(header: dict[str, Any]) -> bytes:
    """A frame's first message from a header of our choosing (no buffers)."""
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


class RawSession:
    """A ``/ws/session`` connection that sends exactly what it is told to."""

    def __init__(self, server: ServerProcess, headers: dict[str, str] | None = None) -> None:
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(connect(
            f"ws://{server.host}:{server.port}/ws/session",
            additional_headers=auth(server.token) if headers is None else headers,
            proxy=None, open_timeout=10, max_size=None,
        ))
        self.decoder = wire.FrameDecoder()
        self.next_id = 1

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def send(self, frame: wire.Frame) -> None:
        for message in wire.encode_frame(frame):
            self.ws.send(bytes(message))

    def receive(self, timeout: float = ANSWER_TIMEOUT_S) -> wire.Frame:
        while True:
            message = self.ws.recv(timeout=timeout)
            frame = self.decoder.feed(message.encode() if isinstance(message, str) else message)
            if frame is not None:
                return frame

    def hello(self, **fields: Any) -> wire.Frame:
        hello = {"session": None, "last_seq": 0, "python": wire.PYTHON_VERSION,
                 "cloudpickle": wire.cloudpickle_version(), "protocol": wire.PROTOCOL_VERSION, **fields}
        self.send(wire.Frame("hello", 0, hello))
        welcome = self.receive()
        assert welcome.type == "welcome", welcome
        # A resumed session ignores ids it has seen: carry on after the last one it got.
        self.next_id = int(welcome["last_request"]) + 1
        return welcome

    def answer(self, request_id: int) -> wire.Frame:
        """The ``result`` or ``error`` frame of a request; output frames are skipped."""
        while True:
            frame = self.receive()
            if frame.id == request_id and frame.type in ("result", "error"):
                return frame

    def call(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None) -> wire.Frame:
        rid = self.next_id
        self.next_id += 1
        self.send(wire.Frame(kind, rid, fields or {}, buffers or []))
        return self.answer(rid)

    def value(self, kind: str, fields: dict[str, Any] | None = None, buffers: list[Any] | None = None) -> Any:
        frame = self.call(kind, fields, buffers)
        assert frame.type == "result", frame
        return wire.loads(frame.buffers)

    def close_reason(self) -> tuple[int | None, str]:
        """Wait for the server to close; returns the code and reason it sent (None: no close frame)."""
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(100):
                self.receive()
        assert isinstance(closed.value, ConnectionClosed)
        received = closed.value.rcvd
        return (received.code, received.reason) if received is not None else (None, "")


def assert_healthy(server: ServerProcess) -> None:
    answer = httpx.get(f"{server.url}/health", trust_env=False, timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"


def assert_session_works(server: ServerProcess, session: str | None = None, **expected: Any) -> None:
    """A (resumed, if ``session``) session runs a cell and still holds ``expected``'s names."""
    with RawSession(server) as raw:
        welcome = raw.hello(session=session)
        assert welcome["resumed"] is (session is not None)
        assert raw.value("cell", {"source": "1 + 1"}) == 2
        if expected:
            assert raw.value("pull", {"names": list(expected)}) == tuple(expected.values())
    assert_healthy(server)


def assert_clear_close(code: int | None, reason: str, *words: str) -> None:
    assert code in CLEAR_CLOSE_CODES, f"closed with {code} (no close frame: the handler crashed?)"
    assert reason, "closed without a reason"
    for word in words:
        assert word in reason, reason


@pytest.fixture
def session(server: ServerProcess) -> Iterator[tuple[RawSession, str]]:
    """An open raw session holding ``kept = 'still here'``; yields it and its id."""
    with RawSession(server) as raw:
        welcome = raw.hello()
        assert raw.call("push", buffers=wire.dumps({"kept": "still here"})).type == "result"
        yield raw, welcome["session"]


# --- the handshake and the first frame -----------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_a_session_without_the_token_is_refused_at_the_handshake(server: ServerProcess, token: str | None) -> None:
    headers = {} if token is None else auth(token)
    with pytest.raises((InvalidStatus, ConnectionClosed)) as refused:
        with RawSession(server, headers=headers) as raw:
            raw.hello()
    if isinstance(refused.value, InvalidStatus):
        assert refused.value.response.status_code in (401, 403)
        assert server.token.encode() not in refused.value.response.body
    else:
        assert isinstance(refused.value, ConnectionClosed)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
    assert_session_works(server)


def test_a_first_frame_other_than_hello_is_refused_and_not_run(server: ServerProcess, tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    with RawSession(server) as raw:
        raw.send(wire.Frame("cell", 1, {"source": f"open({str(witness)!r}, 'w').close()"}))
        code, reason = raw.close_reason()
    assert_clear_close(code, reason, "hello")
    assert not witness.exists()
    assert_session_works(server)


NOT_FRAMES: dict[str, tuple[bytes | str, str]] = {
    "text-message": ("hello", "binary"),
    "too-short": (b"\x00\x01", "header length"),
    "header-not-msgpack": (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "msgpack"),
    "header-not-a-map": (raw_header([1, 2, 3]), "map"),  # type: ignore[arg-type]
    "header-without-type": (raw_header({"v": wire.PROTOCOL_VERSION, "id": 0}), "type"),
    "other-protocol-version": (raw_header({"v": 99, "t": "hello", "id": 0}), "99"),
    "buffers-missing": (raw_header({"v": wire.PROTOCOL_VERSION, "t": "hello", "id": 0, "bufs": [10]}), "sizes"),
}


@pytest.mark.parametrize("name", list(NOT_FRAMES))
def test_a_first_message_that_is_not_a_frame_closes_with_a_reason(server: ServerProcess, name: str) -> None:
    message, word = NOT_FRAMES[name]
    with RawSession(server) as raw:
        raw.ws.send(message)
        code, reason = raw.close_reason()
    assert_clear_close(code, reason, word)
    if name == "other-protocol-version":
        assert str(wire.PROTOCOL_VERSION) in reason  # names both versions
    assert_session_works(server)


def test_a_broken_frame_mid_session_closes_only_that_connection(
    server: ServerProcess, session: tuple[RawSession, str]
) -> None:
    raw, session_id = session
    raw.ws.send(b"\x00\x00\x00\x05garbage")
    code, reason = raw.close_reason()
    assert_clear_close(code, reason)
    assert_session_works(server, session_id, kept="still here")


# --- well-formed frames with bad fields ----------------------------------------------------------


def test_a_hello_with_a_session_id_that_is_not_a_string_is_refused(server: ServerProcess) -> None:
    with RawSession(server) as raw:
        raw.send(wire.Frame("hello", 0, {"session": [1, 2], "last_seq": 0, "python": wire.PYTHON_VERSION,
                                         "cloudpickle": wire.cloudpickle_version()}))
        try:
            welcome = raw.receive()
        except ConnectionClosed as closed:
            received = closed.rcvd
            assert_clear_close(received.code if received else None, received.reason if received else "")
        else:  # or it is taken as an unknown id: a fresh session that works
            assert welcome.type == "welcome" and welcome["resumed"] is False
            assert raw.value("cell", {"source": "3 * 3"}) == 9
    assert_session_works(server)


def test_a_hello_with_a_last_seq_that_is_not_a_number_is_refused(
    server: ServerProcess, session: tuple[RawSession, str]
) -> None:
    _, session_id = session
    with RawSession(server) as raw:
        raw.send(wire.Frame("hello", 0, {"session": session_id, "last_seq": "abc", "python": wire.PYTHON_VERSION,
                                         "cloudpickle": wire.cloudpickle_version()}))
        try:
            raw.receive()  # a welcome may come first
            answered = raw.value("pull", {"names": ["kept"]})
        except ConnectionClosed as closed:
            received = closed.rcvd
            assert_clear_close(received.code if received else None, received.reason if received else "")
        else:
            assert answered == ("still here",)
    assert_session_works(server, session_id, kept="still here")


BAD_FIELDS: dict[str, bytes] = {
    "interrupt-target-not-a-number": b"".join(
        bytes(m) for m in wire.encode_frame(wire.Frame("interrupt", 50, {"target": "abc"}))),
    "ack-seq-not-a-number": b"".join(bytes(m) for m in wire.encode_frame(wire.Frame("ack", 0, {"seq": "abc"}))),
    "request-id-not-a-number": raw_header({"v": wire.PROTOCOL_VERSION, "t": "cell", "id": "abc", "bufs": []}),
    "buffer-size-not-a-number": raw_header({"v": wire.PROTOCOL_VERSION, "t": "push", "id": 50, "bufs": ["x"]}),
}


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_a_frame_with_a_bad_field_is_answered_clearly(
    server: ServerProcess, session: tuple[RawSession, str], name: str
) -> None:
    """An error frame, a close with a reason, or nothing at all while the connection goes on;
    never a handler that crashes and drops the connection without a word."""
    raw, session_id = session
    raw.ws.send(BAD_FIELDS[name])
    good = 100  # past the ids the bad frames use, which the server may have counted
    try:
        raw.send(wire.Frame("cell", good, {"source": "'still answering'"}))
        while True:
            frame = raw.receive()
            if frame.id == good and frame.type in ("result", "error"):
                break
            if frame.type == "error":  # an answer about the bad frame
                assert frame["code"] == "bad_request", frame.fields
        assert frame.type == "result", frame.fields
        assert wire.loads(frame.buffers) == "still answering"
    except ConnectionClosed as closed:
        received = closed.rcvd
        assert_clear_close(received.code if received else None, received.reason if received else "")
    assert_session_works(server, session_id, kept="still here")


BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], list[Any], str]] = {
    "unknown-type": ("frobnicate", {}, [], "bad_request"),
    "pull-names-not-a-list": ("pull", {"names": 5}, [], "bad_request"),
    "push-not-a-dict": ("push", {}, wire.dumps([1, 2]), "bad_request"),
    "push-without-buffers": ("push", {}, [], "pickle"),
    "push-garbage": ("push", {}, [b"not a pickle"], "pickle"),
    "run-garbage": ("run", {}, [b"not a pickle"], "pickle"),
    "run-not-a-call": ("run", {}, wire.dumps(5), "pickle"),
    "cell-without-source": ("cell", {}, [], "bad_request"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_gets_an_error_and_the_session_goes_on(
    server: ServerProcess, session: tuple[RawSession, str], name: str
) -> None:
    kind, fields, buffers, code = BAD_REQUESTS[name]
    raw, session_id = session
    answer = raw.call(kind, fields, buffers)
    assert answer.type == "error", answer
    assert answer["code"] == code, answer.fields
    assert answer["evalue"] and "\n" not in answer["evalue"]
    if name == "unknown-type":
        assert "'frobnicate'" in answer["evalue"]
    # The same connection answers the next request, with the namespace as it was.
    assert raw.value("pull", {"names": ["kept"]}) == ("still here",)
    assert_session_works(server, session_id, kept="still here")


def test_a_hello_from_another_python_refuses_pickled_code_only(server: ServerProcess) -> None:
    with RawSession(server) as raw:
        welcome = raw.hello(python="2.7")
        assert "2.7" in welcome["mismatch"] and wire.PYTHON_VERSION in welcome["mismatch"]
        refused = raw.call("run", buffers=wire.dumps((len, ([1, 2],), {})))
        assert refused.type == "error" and refused["code"] == "version"
        assert raw.value("cell", {"source": "len([1, 2])"}) == 2
        assert raw.call("push", buffers=wire.dumps({"x": 1})).type == "result"
        assert raw.value("pull", {"names": ["x"]}) == (1,)


# --- through the Client --------------------------------------------------------------------------


def test_the_client_reports_an_unknown_request_type_in_one_line(client: Client) -> None:
    with pytest.raises(BadRequestError) as info:
        client.session.call("frobnicate")
    assert "'frobnicate'" in str(info.value) and "\n" not in str(info.value)
    assert client.run_cell("'fine'") == "fine"


@pytest.fixture
def client_only_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A module importable here only, pickled by reference as cloudpickle does for importable code."""
    name = f"client_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class Thing:
            def __init__(self, v):
                self.v = v


        def where():
            return "client"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


def test_code_the_server_cannot_import_is_a_pickling_error_with_a_hint(client: Client, client_only_module: Any) -> None:
    name = client_only_module.__name__
    client.push(kept=1)
    by_reference = wire.dumps((client_only_module.where, (), {}))  # what the server cannot rebuild
    with pytest.raises(PicklingError) as info:
        client.session.call("run", buffers=by_reference)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message and "install it there" in message
    with pytest.raises(PicklingError) as pushed:
        client.session.call("push", buffers=wire.dumps({"thing": client_only_module.Thing(1)}))
    assert repr(name) in str(pushed.value)
    assert client.pull("kept") == 1
    assert client.run_cell("kept + 1") == 2


# --- sizes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with ``--max-body 1MiB``."""
    with ServerProcess(tmp_path_factory.mktemp("small-session-server"), options={"max_body": "1MiB"}) as process:
        yield process


@pytest.mark.parametrize("declared", [2 * 1024 * 1024, 2**40], ids=["2MiB", "1TiB"])
def test_a_frame_declared_larger_than_max_body_is_refused(small_server: ServerProcess, declared: int) -> None:
    """The size a chunked frame declares is checked before anything is allocated or read."""
    with RawSession(small_server) as raw:
        session_id = raw.hello()["session"]
        stream = bytes(wire.dumps({"big": b""})[0])
        raw.ws.send(raw_header({"v": wire.PROTOCOL_VERSION, "t": "push", "id": 1,
                                "bufs": [len(stream), declared], "chunked": True}))
        try:
            raw.ws.send(stream)
            piece = b"\x00" * (512 * 1024)
            for _ in range(min(declared // len(piece), 4)):
                raw.ws.send(piece)
            answer = raw.answer(1)
        except ConnectionClosed as closed:
            received = closed.rcvd
            assert_clear_close(received.code if received else None, received.reason if received else "")
        else:
            assert answer.type == "error", f"a frame of {declared} bytes was taken past --max-body 1MiB"
    assert_session_works(small_server, session_id)


# --- uploads (the buffers of large requests, sent as HTTP bodies) --------------------------------


def put_upload(server: ServerProcess, session_id: str, body: bytes, token: str | None = None) -> httpx.Response:
    return httpx.put(f"{server.url}/session/{session_id}/upload", content=body, trust_env=False, timeout=20,
                     headers=auth(server.token if token is None else token))


def upload_body(**values: Any) -> bytes:
    return b"".join(bytes(part) for part in wire.encode_stream(wire.Frame("upload", 0, {}, wire.dumps(values))))


def test_an_upload_without_the_token_is_refused(server: ServerProcess, session: tuple[RawSession, str]) -> None:
    _, session_id = session
    answer = put_upload(server, session_id, upload_body(x=1), token="wrong-token")
    assert answer.status_code == 401
    assert_session_works(server, session_id, kept="still here")


def test_an_upload_to_an_unknown_session_is_a_404_that_says_so(server: ServerProcess) -> None:
    answer = put_upload(server, uuid.uuid4().hex, upload_body(x=1))
    assert answer.status_code == 404
    assert "no session" in answer.json()["error"]
    assert_healthy(server)


@pytest.mark.parametrize("body", [
    b"",  # nothing at all
    b"\x00\x00",  # half a header length
    b"\x00\x00\x00\x05abc",  # a header cut short
    raw_header({"v": wire.PROTOCOL_VERSION, "t": "upload", "id": 0, "bufs": [4]}) + b"abcd",  # not chunked
    raw_header({"v": wire.PROTOCOL_VERSION, "t": "upload", "id": 0, "bufs": [8], "chunked": True}) + b"abcd",  # short
    raw_header({"v": wire.PROTOCOL_VERSION, "t": "upload", "id": 0, "bufs": [2], "chunked": True}) + b"abcd",  # long
    b"\x00\x00\x00\x02\xc1\xc1",  # a header that is not msgpack
], ids=["empty", "half-length", "short-header", "not-chunked", "short-body", "long-body", "not-msgpack"])
def test_a_malformed_upload_is_a_400_and_the_session_goes_on(
        server: ServerProcess, session: tuple[RawSession, str], body: bytes) -> None:
    raw, session_id = session
    answer = put_upload(server, session_id, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(("bad upload", "the upload ended"))
    assert raw.value("pull", {"names": ["kept"]}) == ("still here",)
    assert_healthy(server)


def test_a_request_naming_an_upload_the_server_lacks_gets_an_error(session: tuple[RawSession, str]) -> None:
    raw, _ = session
    answer = raw.call("push", {"upload": "no-such-upload"})
    assert answer.type == "error" and answer["code"] == "bad_request"
    assert "is not on the server" in answer["evalue"]
    assert raw.value("pull", {"names": ["kept"]}) == ("still here",)


def test_an_upload_is_used_once(server: ServerProcess, session: tuple[RawSession, str]) -> None:
    raw, session_id = session
    upload = put_upload(server, session_id, upload_body(fresh=[1, 2])).json()["upload"]
    assert raw.call("push", {"upload": upload}).type == "result"
    assert raw.value("pull", {"names": ["fresh"]}) == ([1, 2],)
    again = raw.call("push", {"upload": upload})
    assert again.type == "error" and "is not on the server" in again["evalue"]


def test_an_upload_larger_than_max_body_is_refused(small_server: ServerProcess) -> None:
    with RawSession(small_server) as raw:
        session_id = raw.hello()["session"]
        answer = put_upload(small_server, session_id, upload_body(big=b"\x00" * (2 * 1024 * 1024)))
        assert answer.status_code == 413
        declared = raw_header({"v": wire.PROTOCOL_VERSION, "t": "upload", "id": 0, "bufs": [2**40], "chunked": True})
        answer = put_upload(small_server, session_id, declared)  # a small body that declares 1 TiB
        assert answer.status_code == 400 and "over the limit" in answer.json()["error"]
        assert raw.value("cell", {"source": "1 + 1"}) == 2
    assert_healthy(small_server)
