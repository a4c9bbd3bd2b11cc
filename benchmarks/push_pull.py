"""Array throughput of ``Client.push`` / ``Client.pull`` against a raw loopback socket, and the
client's peak memory while it moves the array.

* raw TCP: the same bytes over loopback to a subprocess, both ways: up is ``sendall`` of the
  array's buffer, answered with one byte once the other end has ``recv_into`` a preallocated
  buffer; down is the other end's ``sendall`` into our ``recv_into`` of a preallocated buffer.
* mymps: ``push(x=array)`` and ``pull("x")`` against the real server (``ServerProcess``).

Each is timed ``--repeat`` times, mymps's after ``--warmup`` full-size rounds (printed apart: in a
VM, memory touched for the first time costs more than the transfer); the figures are MB/s (10^6
bytes per second), best and median, and the targets are judged on the medians.

Peak client memory is measured in a fresh subprocess per direction: the peak resident size
(``VmHWM``, reset just before the call) minus the resident size just before the array existed,
as a multiple of the array's size. The array itself counts (the pushed one, or the pulled
result), so 1.0x is the floor and anything above it is copies.

Run: ``.venv/bin/python benchmarks/push_pull.py [--mib 256] [--repeat 5] [--warmup 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import QUIET_ENV, ServerProcess
from _machine import machine_line

os.environ.update(QUIET_ENV)

TARGET_RATIO = 0.60
TARGET_PEAK = 2.5
_OP = struct.Struct(">cQ")


def make_array(nbytes: int):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)


# -- the raw socket baseline ----------------------------------------------------------------------

def serve_bulk() -> None:
    """``U n``: read n bytes into a preallocated buffer, answer one byte. ``D n``: send n bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    buf = bytearray()
    while True:
        head = _recv_exactly(conn, memoryview(bytearray(_OP.size)))
        if head is None:
            return
        op, n = _OP.unpack(head)
        if len(buf) < n:
            buf = bytearray(n)
        if op == b"U":
            _recv_exactly(conn, memoryview(buf)[:n])
            conn.sendall(b"k")
        else:
            conn.sendall(memoryview(buf)[:n])


def _recv_exactly(conn: socket.socket, view: memoryview) -> memoryview | None:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if not n:
            return None
        got += n
    return view


def raw_socket(array, repeat: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    data = memoryview(array).cast("B")
    into = memoryview(bytearray(data.nbytes))
    ack = memoryview(bytearray(1))
    up, down = [], []
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for _ in range(repeat + 1):  # the first of each is a warm-up (the far end allocates)
                start = time.perf_counter()
                conn.sendall(_OP.pack(b"U", data.nbytes))
                conn.sendall(data)
                _recv_exactly(conn, ack)
                up.append(time.perf_counter() - start)
                start = time.perf_counter()
                conn.sendall(_OP.pack(b"D", data.nbytes))
                _recv_exactly(conn, into)
                down.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(10)
    return up[1:], down[1:]


# -- mymps ----------------------------------------------------------------------------------------

def mymps_push_pull(client, array, repeat: int, warmup: int):  # type: ignore[no-untyped-def]
    """Times of ``repeat`` pushes and pulls, after ``warmup`` of each (timed apart).

    Why warm up with the full size: each push and pull allocates a fresh array. In a VM, memory
    the guest never touched costs a host page fault per page the first time, several times the
    transfer itself; the raw socket baseline reuses one buffer and never pays it.
    """
    import numpy as np

    client.push(x=array[:1024])  # imports, session open
    client.pull("x")
    first: list[float] = []
    for _ in range(warmup):
        start = time.perf_counter()
        client.push(x=array)
        back = client.pull("x")
        first.append(time.perf_counter() - start)
        del back
    up, down = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        client.push(x=array)
        up.append(time.perf_counter() - start)
    back = client.pull("x")
    if not np.array_equal(back, array):
        raise SystemExit("pull returned a different array than was pushed")
    del back
    for _ in range(repeat):
        start = time.perf_counter()
        back = client.pull("x")
        down.append(time.perf_counter() - start)
        del back
    return up, down, first


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh: what the process did before must not count. (``ru_maxrss``
    cannot be used: Linux carries it over from the parent across fork and exec.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def memory_probe(direction: str, port: int, token: str, nbytes: int) -> None:
    """Run in a fresh process: one push or one pull, and print the peak memory as JSON."""
    from mymps_magic.client import Client

    with Client("127.0.0.1", port, token=token) as client:
        client.push(warm=make_array(4096))  # imports and the session, before the baseline
        client.pull("warm")
        if direction == "pull":
            client.run_cell(f"x = np.random.default_rng(0).random({nbytes // 4}, dtype=np.float32)")
        before = _rss()
        _reset_peak()
        if direction == "push":
            array = make_array(nbytes)
            client.push(x=array)
        else:
            array = client.pull("x")
            assert array.nbytes == nbytes
        peak = _peak()
    print(json.dumps({"before": before, "peak": peak, "after": _rss()}))


def peak_memory(direction: str, server: ServerProcess, nbytes: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory", direction, "--port", str(server.port), "--mib", str(nbytes >> 20)],
        env={**os.environ, "MYMPS_TOKEN": server.token}, capture_output=True, text=True, check=True,
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    return (probe["peak"] - probe["before"]) / nbytes


def mbps(nbytes: int, seconds: list[float]) -> tuple[float, float]:
    rates = [nbytes / s / 1e6 for s in seconds]
    return max(rates), statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB (float32)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="full-size push+pull rounds before timing")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", choices=["push", "pull"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    nbytes = args.mib << 20
    if args.serve:
        serve_bulk()
        return
    if args.memory:
        memory_probe(args.memory, args.port, os.environ["MYMPS_TOKEN"], nbytes)
        return

    from mymps_magic.client import Client

    print(machine_line(), flush=True)
    array = make_array(nbytes)
    raw_up, raw_down = raw_socket(array, args.repeat)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        with Client("127.0.0.1", server.port, token=server.token) as client:
            push, pull, first = mymps_push_pull(client, array, args.repeat, args.warmup)
            client.reset()
        del array
        peak_push = peak_memory("push", server, nbytes)
        peak_pull = peak_memory("pull", server, nbytes)

    rows = [("raw TCP up (sendall -> recv_into)", raw_up), ("mymps push", push),
            ("raw TCP down (sendall -> recv_into)", raw_down), ("mymps pull", pull)]
    print(f"{args.mib} MiB float32 array over loopback, {args.repeat} runs each (MB/s = 10^6 bytes/s):")
    print(f"  {'':38} {'best':>8} {'median':>8}")
    for name, seconds in rows:
        best, med = mbps(nbytes, seconds)
        print(f"  {name:38} {best:8.0f} {med:8.0f}")
    if first:
        rates = ", ".join(f"{2 * nbytes / t / 1e6:.0f}" for t in first)
        print(f"  warm-up rounds, push + pull each (fresh memory): {rates} MB/s")
    ok = {True: "met", False: "NOT met"}
    print("targets (on the medians):")
    for name, mine, raw in (("push", push, raw_up), ("pull", pull, raw_down)):
        (best, med), (raw_best, raw_med) = mbps(nbytes, mine), mbps(nbytes, raw)
        ratio = med / raw_med
        print(f"  {name} >= {TARGET_RATIO:.0%} of raw socket: median {ratio:.0%} (best {best / raw_best:.0%}), "
              f"{ok[ratio >= TARGET_RATIO]}")
    for name, peak in (("push", peak_push), ("pull", peak_pull)):
        print(f"  peak client memory during {name} < {TARGET_PEAK}x the array: {peak:.2f}x, {ok[peak < TARGET_PEAK]}")


if __name__ == "__main__":
    main()
