"""The token boundary, route by route (issue 16, item 1).

The routes come from the app itself (``create_app``'s router, walked the way FastAPI walks it), not
from a list, so a route added later is covered without touching this file: every OpenAPI
operation, ``/docs``, ``/redoc``, the upload route, both WebSockets, and paths that match nothing.
Each is asked with a missing token and with near misses of the real one (case, whitespace, an
empty ``Bearer``, the token in the query string or a cookie, a look-alike character, one character
more or less). Requests are raw where the request itself must be odd: a raw socket sends a
WebSocket handshake and its frames in one write, before any answer.
"""

from __future__ import annotations

import base64
import os
import pickle
import re
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from kit import MakeServer, ServerProcess, TinyModels, auth, wait_for
from rawhttp import read_answer, read_head
from mymps_magic import Client, wire

MODEL = "boundary-net"

Route = tuple[str, str]  # (method or "WS", path with its parameters filled in)


def app_routes() -> list[Route]:
    """Every route of the app the server builds, as ``(method, path)``; ``"WS"`` for WebSockets.

    Path parameters get a real model name, so that a request that got through would act on
    something (an unload, an info) rather than fail on a name.
    """
    from fastapi.routing import iter_route_contexts
    from starlette.routing import WebSocketRoute

    from kernel_server.app import create_app
    from kernel_server.settings import Settings

    app = create_app(Settings(home=Path("/nonexistent-mymps-home")), token="unused")
    routes: list[Route] = []
    for context in iter_route_contexts(app.router.routes):
        path = re.sub(r"\{[^}]*\}", MODEL, str(context.path_format))
        if isinstance(context.original_route, WebSocketRoute):
            routes.append(("WS", path))
        else:
            routes += [(method, path) for method in sorted(context.methods or {"GET"})]
    return routes


UNKNOWN_PATHS = ["/no/such/path", "/health/", "//health", "/health/../models", f"/models/{MODEL}/info/extra",
                 "/ws/nothing", "/openapi.json/x", "/docs/x"]


def near_misses(token: str) -> dict[str, tuple[str, list[tuple[bytes, bytes]]]]:
    """Credentials that are not the token, each ``name -> (query string, headers)``."""
    alike = chr(ord(token[0]) + 0xFEE0) + token[1:]  # its first character's fullwidth twin
    bearer: dict[str, str] = {
        "wrong": "Bearer wrong-token",
        "empty-bearer": "Bearer ",
        "bare-bearer": "Bearer",
        "no-scheme": token,
        "basic-scheme": f"Basic {token}",
        "basic-encoded": "Basic " + base64.b64encode(f"mymps:{token}".encode()).decode(),
        "upper-case-token": f"Bearer {token.upper()}",
        "double-space": f"Bearer  {token}",
        "tab": f"Bearer\t{token}",
        "inner-space": f"Bearer {token[:10]} {token[10:]}",
        "one-longer": f"Bearer {token}0",
        "one-shorter": f"Bearer {token[:-1]}",
        "twice": f"Bearer {token}{token}",
        "prefix": f"Bearer {token[:8]}",
        "look-alike": f"Bearer {alike}",
        "quoted": f'Bearer "{token}"',
    }
    cases: dict[str, tuple[str, list[tuple[bytes, bytes]]]] = {"none": ("", [])}
    for name, value in bearer.items():
        cases[name] = ("", [(b"authorization", value.encode())])
    for name in ("token", "access_token", "authorization"):
        cases[f"query-{name}"] = (f"{name}={token}", [])
    cases["cookie"] = ("", [(b"cookie", f"token={token}; authorization=Bearer%20{token}".encode())])
    cases["other-header"] = ("", [(b"x-authorization", f"Bearer {token}".encode()),
                                  (b"proxy-authorization", f"Bearer {token}".encode())])
    return cases


def raw_request(server: ServerProcess, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes; the answer's status and whatever else came until the server closed or
    finished its answer (the head, and the body when its length is known)."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(request)
        head, body = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 "), head[:200]
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def ws_handshake(server: ServerProcess, path: str, headers: list[tuple[bytes, bytes]], after: bytes = b"") -> bytes:
    """A WebSocket opening handshake for ``path``, then ``after`` (frames) in the same write."""
    lines = [f"GET {path} HTTP/1.1".encode(), f"Host: {server.host}:{server.port}".encode(),
             b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
             b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16))]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + after


def masked(payload: bytes, opcode: int = 0x2) -> bytes:
    """One client-to-server WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x80 | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def http_request(server: ServerProcess, method: str, path: str, headers: list[tuple[bytes, bytes]],
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {server.host}:{server.port}".encode(),
             b"Connection: close", f"Content-Length: {len(body)}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[ServerProcess]:
    """A server of this module's own, holding one model that an unload getting through would remove."""
    with ServerProcess(tmp_path_factory.mktemp("boundary-home")) as server:
        with Client(port=server.port, token=server.token) as client:
            client.load_model(MODEL, kind="torchscript", path=str(tiny_models.torchscript), progress=False)
        yield server


def assert_untouched(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health", trust_env=False, timeout=30)
    assert health.status_code == 200 and MODEL in health.json()["models"], health.text


def test_the_routes_are_read_from_the_app() -> None:
    routes = app_routes()
    # What the app has today; a new route joins the checks below by itself.
    for route in [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/health"),
                  ("PUT", f"/session/{MODEL}/upload"), ("WS", "/ws/session"), ("WS", "/ws/generate"),
                  ("DELETE", f"/models/{MODEL}")]:
        assert route in routes


@pytest.mark.slow
def test_every_route_refuses_every_near_miss_of_the_token(guarded: ServerProcess) -> None:
    token = guarded.token
    routes = [route for route in app_routes() if route[1] != "/health"]
    routes += [(method, path) for path in UNKNOWN_PATHS for method in ("GET", "POST")]
    routes += [("OPTIONS", path) for method, path in app_routes() if method != "WS" and path != "/health"]
    let_through: list[str] = []
    for method, path in routes:
        for name, (query, headers) in near_misses(token).items():
            target = f"{path}?{query}" if query else path
            if method == "WS":
                status, answer = raw_request(guarded, ws_handshake(guarded, target, headers))
                refused = status in (401, 403)
            else:
                status, answer = raw_request(guarded, http_request(guarded, method, target, headers))
                refused = status == 401 and (method == "HEAD" or b"token" in answer)
            if not refused or token.encode() in answer:
                let_through.append(f"{method} {target} with {name}: {status}")
    assert not let_through, "\n".join(let_through)
    assert_untouched(guarded)


def test_the_real_token_passes_on_every_route(guarded: ServerProcess) -> None:
    """The control for the test above: with the token, no route answers 401."""
    headers = [(b"authorization", f"Bearer {guarded.token}".encode())]
    for method, path in app_routes():
        if method == "WS" or (method == "DELETE" and path.startswith("/models/")):
            continue
        status, _ = raw_request(guarded, http_request(guarded, method, path, headers))
        assert status != 401, f"{method} {path}"
    assert_untouched(guarded)


class WritesMarker:
    """Unpickling it writes ``path``: a stand-in for any code an attacker would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.path)!r}, 'w').write('unpickled')",)


def session_frames(marker: Path) -> bytes:
    """A hello and a ``run`` whose pickled function writes ``marker`` when unpickled, as the
    WebSocket messages a client would send."""
    hello = wire.hello(None, 0)
    run = wire.request("run", 1, 0, buffers=[pickle.dumps((WritesMarker(marker), (), {}), protocol=5)])
    return b"".join(masked(bytes(message)) for frame in (hello, run) for message in wire.encode_frame(frame))


def test_the_marker_pickle_runs_when_the_token_is_right(guarded: ServerProcess, tmp_path: Path) -> None:
    """The control for the two tests below: the same frames with the token do write the marker.
    (They follow the 101, as RFC 6455 asks of a client: uvicorn drops bytes that come in the
    same packet as the handshake, so the refused cases below send them both ways.)"""
    marker = tmp_path / "marker"
    request = ws_handshake(guarded, "/ws/session", [(b"authorization", f"Bearer {guarded.token}".encode())])
    with socket.create_connection((guarded.host, guarded.port), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        sock.sendall(session_frames(marker))
        wait_for(marker.exists, "the authenticated pickle to run")


def refused_handshake(server: ServerProcess, path: str, headers: list[tuple[bytes, bytes]], frames: bytes) -> int:
    """Send a handshake and ``frames`` without waiting (in one write, then again in two), as an
    attacker would; the status of each answer, which must be the same."""
    status, _ = raw_request(server, ws_handshake(server, path, headers, frames))
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(ws_handshake(server, path, headers))
        sock.sendall(frames)
        answer = b""
        while b"\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
    assert answer.split(b" ", 2)[1] == str(status).encode(), answer[:200]
    return status


@pytest.mark.parametrize("near_miss", ["none", "wrong", "one-longer", "query-token", "cookie"])
def test_unauthenticated_frames_sent_with_the_handshake_are_never_unpickled(
    guarded: ServerProcess, tmp_path: Path, near_miss: str
) -> None:
    marker = tmp_path / "marker"
    query, headers = near_misses(guarded.token)[near_miss]
    target = f"?{query}" if query else ""
    assert refused_handshake(guarded, f"/ws/session{target}", headers, session_frames(marker)) in (401, 403)
    assert refused_handshake(guarded, f"/ws/generate{target}", headers, masked(
        b'{"model": "boundary-net", "prompt": "x"}', opcode=0x1)) in (401, 403)
    with Client(port=guarded.port, token=guarded.token) as client:
        # Device work runs in one ordered queue: had the frames queued a job, it ran before this.
        assert client.run(int, 7) == 7
    assert not marker.exists()
    assert_untouched(guarded)


def test_unauthenticated_pickled_bodies_are_never_unpickled(guarded: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    body = pickle.dumps(WritesMarker(marker), protocol=5)
    frame = b"".join(bytes(part) for part in wire.encode_stream(
        wire.Frame("upload", 0, {}, [pickle.dumps((WritesMarker(marker), (), {}), protocol=5)])))
    for method, path in app_routes():
        if method in ("WS", "GET", "HEAD"):
            continue
        for payload in (body, frame):
            status, _ = raw_request(guarded, http_request(guarded, method, path, [
                (b"authorization", b"Bearer wrong"), (b"content-type", b"application/octet-stream"),
                (b"x-model", MODEL.encode())], payload))
            assert status == 401, f"{method} {path}"
    with Client(port=guarded.port, token=guarded.token) as client:
        assert client.run(int, 7) == 7
    assert not marker.exists()
    assert_untouched(guarded)


def _rss(server: ServerProcess) -> int:
    assert server.process is not None
    return int(psutil.Process(server.process.pid).memory_info().rss)


@pytest.mark.parametrize("token", ["wrong", "right"])
def test_a_10_gib_declared_body_is_refused_without_memory_growth(guarded: ServerProcess, token: str) -> None:
    """A body announced as 10 GiB is answered from its headers (401 without the token, 413 with
    it: over the default --max-body of 4 GiB) while the sender keeps sending; the server
    reads none of it into memory."""
    before = _rss(guarded)
    value = guarded.token if token == "right" else "wrong"
    head = (f"POST /generate HTTP/1.1\r\nHost: {guarded.host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {value}\r\nContent-Length: {10 * 1024**3}\r\n\r\n").encode()
    with socket.create_connection((guarded.host, guarded.port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0

        def keep_sending() -> None:
            nonlocal sent
            chunk = b"x" * (1 << 20)
            try:
                while sent < 256 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the server answered and closed: what we want
                pass

        sender = threading.Thread(target=keep_sending)
        sender.start()
        answer = read_head(sock)
        sender.join()
    assert answer.split(b" ", 2)[1] == (b"413" if token == "right" else b"401"), answer[:300]
    assert _rss(guarded) - before < 64 << 20, f"the server grew by {(_rss(guarded) - before) >> 20} MiB"
    assert_untouched(guarded)


@pytest.mark.slow
def test_the_server_home_is_private_and_the_token_is_never_shown(
    make_server: MakeServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """After a server has loaded, run, failed and stopped: its home and every file in it are its
    user's only, and the token is in no log line, error, ``/health``, ``/stats``, ``/openapi.json``
    or page of the dashboard before it."""
    from dashboardprocess import DashboardProcess

    server = make_server(token_file=True)
    token = server.token
    with httpx.Client(base_url=server.url, headers=auth(token), trust_env=False, timeout=60) as http:
        for method, path, kwargs in [
            ("GET", "/health", {}), ("GET", "/stats", {}), ("GET", "/models", {}), ("GET", "/jobs", {}),
            ("GET", "/openapi.json", {}), ("GET", f"/models/{token}/info", {}), ("GET", f"/x?token={token}", {}),
            ("POST", "/generate", {"json": {"model": token, "prompt": token}}),
            ("POST", "/models/load", {"json": {"name": token, "kind": "torchscript", "path": f"/no/{token}"}}),
            ("DELETE", f"/jobs/{token[:12]}", {}),
        ]:
            answer = http.request(method, path, **kwargs)
            if method == "GET" and path in ("/health", "/stats", "/openapi.json"):
                assert token not in answer.text, path
        for wrong in (f"{token}x", token[:-1]):  # what the client sent is not echoed either
            answer = httpx.get(f"{server.url}/models", headers=auth(wrong), trust_env=False)
            assert answer.status_code == 401 and token[:-1] not in answer.text
    with Client(port=server.port, token=token) as client:
        client.load_model(MODEL, kind="torchscript", path=str(tiny_models.torchscript), progress=False)
        client.push(kept=1)
        with pytest.raises(Exception):  # noqa: B017 - any remote error will do: its text is checked below
            client.run(eval, f"1/0  # {token}")
    with DashboardProcess(server.port, token, tmp_path / "dashboard-home") as dashboard:
        for page in ("/", "/status", "/static/dashboard.js"):
            answer = httpx.get(f"{dashboard.url}{page}", trust_env=False, timeout=30)
            assert answer.status_code == 200 and token not in answer.text, page
        dashboard_log = dashboard.log_path.read_text(errors="replace")
    server.stop()

    for text in (server.log_text(), (server.home / "server.log").read_text(errors="replace"), dashboard_log):
        assert token not in text
    files = [path for path in server.home.rglob("*") if path.is_file()]
    assert {"token", "server.log", "state.json"} <= {path.name for path in files}
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} has mode {oct(mode)}"
