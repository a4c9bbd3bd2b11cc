"""Small calls through the SSH tunnel: ``/health``, ``Client.models()`` and a no-op ``Client.run``.

Three rows, in one run, against one real server and one real sshd on this machine (the test
kit's `ServerProcess` and `tests/sshd.py`), so the ssh hop is the only difference:

* loopback: the Client straight to the server's port, no tunnel (the floor);
* plain ``ssh -N -L``: the forward everyone writes by hand. sshd sets ``TCP_NODELAY`` only when
  a session starts and ``-N`` starts none, so an answer written in two pieces waits for the
  client's delayed ACK: about 40 ms for some or all of the HTTP calls (which ones varies from
  run to run); WebSocket frames, written whole, pass;
* ``mymps tunnel``: the real command, which runs a waiting remote command in a terminal so that
  both ssh ends set ``TCP_NODELAY``; its target is a median under 2 ms for each call.

Run: ``.venv/bin/python benchmarks/tunnel_latency.py [--calls 300] [--warmup 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import QUIET_ENV, ROOT, ServerProcess, summary

from mymps_magic.cli.localserver import free_port  # noqa: E402
from sshd import SSHServer, missing_tools  # noqa: E402

os.environ.update(QUIET_ENV)

TARGET_MEDIAN_MS = 2.0


def noop() -> None:
    return None


def measure(port: int, token: str | None, calls: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each kind, through whatever listens on ``port``."""
    from mymps_magic import Client

    with Client("127.0.0.1", port, token=token) as client:
        kinds: dict[str, Callable[[], object]] = {
            "/health": client.health,
            "Client.models()": client.models,
            "Client.run(noop)": lambda: client.run(noop),
        }
        times: dict[str, list[float]] = {}
        for name, call in kinds.items():
            for _ in range(warmup):
                call()
            seconds = []
            for _ in range(calls):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            times[name] = seconds
    return times


def wait_until_answering(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0, trust_env=False).raise_for_status()
            return
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the forward on port {port} did not come up (exit status {process.poll()})")
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each kind through each path")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    reason = missing_tools()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")

    rows: list[tuple[str, dict[str, list[float]]]] = []
    with tempfile.TemporaryDirectory() as tmp, SSHServer(Path(tmp) / "sshd") as sshd, \
            ServerProcess(Path(tmp) / "remote-home", token_file=True) as server:
        rows.append(("loopback, no tunnel", measure(server.port, server.token, args.calls, args.warmup)))

        plain_port = free_port()
        plain = subprocess.Popen(
            ["ssh", "-p", str(sshd.port), *sshd.client_options, "-N",
             "-L", f"127.0.0.1:{plain_port}:127.0.0.1:{server.port}", sshd.destination],
            stdin=subprocess.DEVNULL)
        try:
            wait_until_answering(plain_port, plain)
            # Fewer calls: each /health costs ~40 ms here.
            rows.append(("plain ssh -N -L", measure(plain_port, server.token, max(50, args.calls // 4), args.warmup)))
        finally:
            stop(plain)

        tunnel_port = free_port()
        local_home = Path(tmp) / "local-home"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
        env["MYMPS_HOME"] = str(local_home)
        tunnel = subprocess.Popen(
            [sys.executable, "-m", "mymps_magic.cli", "tunnel", sshd.destination, *sshd.mymps_options,
             "--local-port", str(tunnel_port), "--remote-port", str(server.port), "--remote-home", str(server.home)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_until_answering(tunnel_port, tunnel)
            token = (local_home / "token").read_text().strip()  # the token the tunnel fetched
            rows.append(("mymps tunnel", measure(tunnel_port, token, args.calls, args.warmup)))
        finally:
            stop(tunnel)

    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    print(f"{ssh_version}; {args.calls} calls of each kind (plain forward: fewer), sequential, one Client")
    for label, times in rows:
        for name, seconds in times.items():
            print(f"{label:<20} {name:<17} {summary(seconds)}")
    medians = {name: statistics.median(seconds) * 1e3 for name, seconds in rows[-1][1].items()}
    verdict = "OK" if max(medians.values()) < TARGET_MEDIAN_MS else "OVER TARGET"
    print(f"mymps tunnel: every median under {TARGET_MEDIAN_MS:g} ms? {verdict} "
          f"({', '.join(f'{name} {ms:.2f} ms' for name, ms in medians.items())})")


if __name__ == "__main__":
    main()
