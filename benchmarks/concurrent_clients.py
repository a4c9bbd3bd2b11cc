"""Behaviour under concurrent clients: throughput and fairness, and what one session's long job
does to another session's calls.

* Scaling: 1, 2, 4 and 8 client processes, each with its own ``Client`` (its own session), call
  ``run(noop)`` back to back for ``--seconds``. Printed: the total calls per second and each
  client's median and p99 latency, against the single client of the same run (the baseline).
  Device work of all sessions runs one job at a time (SPEC 3), so the total cannot grow past
  what one worker does; what matters is that it does not fall, and that no client starves.
* Isolation: while session A runs a 3-second job on the device, session B calls ``push``,
  ``pull``, ``/health`` and ``/jobs``; each is timed against the same call with the server
  idle. SPEC 3: metadata calls and push/pull never wait behind another session's job. B's own
  ``run`` does wait for A's job, by design, and that wait is printed too.

Run: ``.venv/bin/python benchmarks/concurrent_clients.py [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import QUIET_ENV, ServerProcess
from _machine import machine_line

os.environ.update(QUIET_ENV)

CLIENT_COUNTS = (1, 2, 4, 8)
JOB_S = 3.0


def noop() -> None:
    return None


def long_job(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def caller(port: int, token: str, start_at: float, seconds: float) -> None:
    """One client process: no-op calls from ``start_at`` for ``seconds``; prints the latencies."""
    from mymps_magic import Client

    with Client("127.0.0.1", port, token=token) as client:
        for _ in range(100):  # warm-up: session open, function pickled
            client.run(noop)
        while time.time() < start_at:
            time.sleep(0.001)
        latencies = []
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            client.run(noop)
            latencies.append(time.perf_counter() - now)
    print(json.dumps(latencies))


def scaling(server: ServerProcess, clients: int, seconds: float) -> list[list[float]]:
    start_at = time.time() + 3.0 + 0.3 * clients  # every process started and warmed up by then
    procs = [subprocess.Popen([sys.executable, __file__, "--caller", str(server.port), str(start_at), str(seconds)],
                              env={**os.environ, "MYMPS_TOKEN": server.token}, stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=60 + seconds)
        if proc.returncode:
            raise SystemExit(f"a client process failed (exit {proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def timed(call) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def isolation(server: ServerProcess) -> dict[str, tuple[list[float], list[float]]]:
    """Per call: (idle latencies, latencies while another session's job runs)."""
    import httpx

    from mymps_magic import Client

    auth = {"Authorization": f"Bearer {server.token}"}
    with Client("127.0.0.1", server.port, token=server.token) as a, \
            Client("127.0.0.1", server.port, token=server.token) as b, \
            httpx.Client(base_url=server.url, headers=auth, timeout=30, trust_env=False) as http:
        b.push(x=1)
        calls = {
            "push(x=1)": lambda: b.push(x=1),
            'pull("x")': lambda: b.pull("x"),
            "GET /health": lambda: http.get("/health").raise_for_status(),
            "GET /jobs": lambda: http.get("/jobs").raise_for_status(),
        }
        idle = {name: [timed(call) for _ in range(50)] for name, call in calls.items()}
        job = a.submit(long_job, JOB_S)
        while job.job_id is None:  # it runs now
            time.sleep(0.001)
        busy: dict[str, list[float]] = {name: [] for name in calls}
        deadline = time.monotonic() + JOB_S - 0.5
        while time.monotonic() < deadline:
            for name, call in calls.items():
                busy[name].append(timed(call))
            time.sleep(0.01)
        waited = timed(lambda: b.run(noop))  # queued behind A's job
        job.result(timeout=30)
    results = {name: (idle[name], busy[name]) for name in calls}
    results["run(noop), queued behind it"] = ([], [waited])
    return results


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each scaling round calls")
    parser.add_argument("--caller", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.caller:
        port, start_at, seconds = args.caller
        caller(int(port), os.environ["MYMPS_TOKEN"], float(start_at), float(seconds))
        return

    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        rounds = {n: scaling(server, n, args.seconds) for n in CLIENT_COUNTS}
        apart = isolation(server)

    print(f"no-op run, N client processes with a session each, {args.seconds:g} s (baseline: 1 client):")
    print(f"  {'clients':>7} {'calls/s':>9} {'vs 1 client':>11}   per-client median (p99), slowest client")
    single = sum(len(lat) for lat in rounds[1]) / args.seconds
    for n, latencies in rounds.items():
        rate = sum(len(lat) for lat in latencies) / args.seconds
        medians = [statistics.median(lat) for lat in latencies]
        p99s = [sorted(lat)[int(len(lat) * 0.99)] for lat in latencies]
        fewest = min(len(lat) for lat in latencies) / args.seconds
        print(f"  {n:>7} {rate:>9,.0f} {rate / single:>10.0%}   {us(statistics.median(medians))} "
              f"({us(statistics.median(p99s))}), slowest client {fewest:,.0f} calls/s")
    print(f"while another session runs a {JOB_S:g} s job on the device (median, max):")
    for name, (idle, busy) in apart.items():
        if idle:
            print(f"  {name:28} idle {ms(statistics.median(idle))} (max {ms(max(idle))}) | "
                  f"during the job {ms(statistics.median(busy))} (max {ms(max(busy))}), {len(busy)} calls")
        else:
            print(f"  {name:28} waited {busy[0]:.2f} s (device work runs one job at a time, by design)")


if __name__ == "__main__":
    main()
