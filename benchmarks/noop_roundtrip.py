"""No-op call round trip: ``Client.run(noop)`` against the transports under it and ipyparallel.

Each row is ``--calls`` sequential round trips after ``--warmup`` ones, all in this run:

* raw TCP ping-pong: 64 bytes each way over loopback (TCP_NODELAY), echoed by a subprocess;
  the floor any Python client/server pair pays.
* WebSocket echo (websockets): a minimal asyncio ``websockets`` echo server in a subprocess,
  the client is ``websockets.sync.client`` as in mymps.
* WebSocket echo (uvicorn): the server's own stack (uvicorn, ``websockets-sansio``, Starlette,
  uvloop) echoing, so what remains above it is mymps's own code.
* ipyparallel: ``view.apply_sync(noop)`` on one local engine (``ipp.Cluster(n=1)``).
* mymps: ``Client.run(noop)`` against the real server (``ServerProcess``).

Run: ``.venv/bin/python benchmarks/noop_roundtrip.py [--calls 2000] [--warmup 200] [--no-ipp]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import QUIET_ENV, ServerProcess
from _machine import machine_line

os.environ.update(QUIET_ENV)

MESSAGE = b"x" * 64
TARGET_MEDIAN_US = 200.0
TARGET_P99_US = 1000.0
TARGET_IPP_RATIO = 10.0


def noop() -> None:
    return None


# -- echo servers, each run as `python noop_roundtrip.py --serve KIND` in its own process ---------

def serve_tcp() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(65536)
    while True:
        n = conn.recv_into(buf)
        if not n:
            return
        conn.sendall(memoryview(buf)[:n])


def serve_websockets() -> None:
    import asyncio

    from websockets.asyncio.server import serve

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
            print(next(iter(server.sockets)).getsockname()[1], flush=True)
            await server.serve_forever()

    asyncio.run(main())


def serve_uvicorn() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await ws.send_bytes(message["bytes"])

    sock = socket.create_server(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    app = Starlette(routes=[WebSocketRoute("/echo", echo)])
    # The same settings as `python -m kernel_server`.
    config = uvicorn.Config(app, ws="websockets-sansio", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


SERVERS = {"tcp": serve_tcp, "websockets": serve_websockets, "uvicorn": serve_uvicorn}


class EchoProcess:
    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def __enter__(self) -> EchoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- measuring -------------------------------------------------------------------------------------

def measure(call: Callable[[], object], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    clock = time.perf_counter
    for _ in range(calls):
        start = clock()
        call()
        out.append(clock() - start)
    return out


def stats_us(seconds: list[float]) -> tuple[float, float, float]:
    us = sorted(s * 1e6 for s in seconds)
    return statistics.median(us), us[min(len(us) - 1, int(len(us) * 0.99))], us[-1]


def tcp_pingpong(calls: int, warmup: int) -> list[float]:
    with EchoProcess("tcp") as echo:
        sock = socket.create_connection(("127.0.0.1", echo.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(len(MESSAGE))

        def call() -> None:
            sock.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                got += sock.recv_into(memoryview(buf)[got:])

        try:
            return measure(call, calls, warmup)
        finally:
            sock.close()


def ws_echo(kind: str, calls: int, warmup: int) -> list[float]:
    from websockets.sync.client import connect

    with EchoProcess(kind) as echo:
        path = "/echo" if kind == "uvicorn" else "/"
        with connect(f"ws://127.0.0.1:{echo.port}{path}", compression=None, max_size=None, proxy=None) as ws:

            def call() -> None:
                ws.send(MESSAGE)
                ws.recv()

            return measure(call, calls, warmup)


def mymps_run(calls: int, warmup: int) -> list[float]:
    from mymps_magic.client import Client

    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        with Client("127.0.0.1", server.port, token=server.token) as client:
            return measure(lambda: client.run(noop), calls, warmup)


def ipyparallel_apply(calls: int, warmup: int) -> list[float] | str:
    """The same no-op through ``apply_sync`` on one local engine, or why it could not run."""
    try:
        import ipyparallel as ipp
    except ImportError as exc:
        return f"not measured: ipyparallel is not importable ({exc})"
    cluster = None
    try:
        cluster = ipp.Cluster(n=1, log_level=40)
        rc = cluster.start_and_connect_sync(activate=False)
        try:
            rc.wait_for_engines(1, timeout=60)
            view = rc[0]
            view.block = True
            return measure(lambda: view.apply_sync(noop), calls, warmup)
        finally:
            rc.close()
    except Exception as exc:  # any failure to start the cluster is reported, not fatal
        return f"not measured: the cluster did not start ({type(exc).__name__}: {exc})"
    finally:
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as exc:
                print(f"(stopping the ipyparallel cluster failed: {exc})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-ipp", action="store_true", help="skip ipyparallel (it takes ~10 s to start)")
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve]()
        return

    print(machine_line(), flush=True)
    n, w = args.calls, args.warmup
    rows: list[tuple[str, list[float] | str]] = [
        ("raw TCP ping-pong (64 B, TCP_NODELAY)", tcp_pingpong(n, w)),
        ("WebSocket echo (websockets asyncio)", ws_echo("websockets", n, w)),
        ("WebSocket echo (uvicorn, server's stack)", ws_echo("uvicorn", n, w)),
        ("ipyparallel apply_sync(noop), 1 engine",
         "skipped (--no-ipp)" if args.no_ipp else ipyparallel_apply(n, w)),
        ("mymps Client.run(noop)", mymps_run(n, w)),
    ]
    print(f"no-op round trip, {n} sequential calls after {w} warm-up (microseconds):")
    print(f"  {'':44} {'median':>8} {'p99':>8} {'max':>8}")
    medians: dict[str, float] = {}
    for name, result in rows:
        if isinstance(result, str):
            print(f"  {name:44} {result}")
            continue
        med, p99, top = stats_us(result)
        medians[name] = med
        print(f"  {name:44} {med:8.0f} {p99:8.0f} {top:8.0f}")

    mine = rows[-1][1]
    assert not isinstance(mine, str)
    med, p99, _ = stats_us(mine)
    ok = {True: "met", False: "NOT met"}
    print("targets:")
    print(f"  median < {TARGET_MEDIAN_US:.0f} us: {med:.0f} us, {ok[med < TARGET_MEDIAN_US]}")
    print(f"  p99 < {TARGET_P99_US:.0f} us: {p99:.0f} us, {ok[p99 < TARGET_P99_US]}")
    ipp_row = rows[3][1]
    if isinstance(ipp_row, str):
        print(f"  >= {TARGET_IPP_RATIO:.0f}x faster than ipyparallel: not measured")
    else:
        ratio = stats_us(ipp_row)[0] / med
        print(f"  >= {TARGET_IPP_RATIO:.0f}x faster than ipyparallel (median): {ratio:.1f}x, "
              f"{ok[ratio >= TARGET_IPP_RATIO]}")
    for name in list(medians)[:3]:
        print(f"  mymps above {name}: {med - medians[name]:+.0f} us median")


if __name__ == "__main__":
    main()
