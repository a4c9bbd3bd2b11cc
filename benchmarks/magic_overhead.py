"""The time an empty ``%%mymps`` cell adds, against an empty local cell, in one real kernel.

One IPython kernel (jupyter_client, as a notebook front end drives it) runs ``--cells`` empty
local cells (``pass``) and as many empty remote cells (``%%mymps`` + ``pass``), alternately, after
``--warmup`` of each. The remote cells go to the real server (``ServerProcess``) on loopback. A
round trip is what the front end sees: from sending ``execute_request`` until it has both the
``execute_reply`` and the kernel's ``idle`` status. The script reads the replies with blocking
calls, so polling adds nothing.

Two reference rows split the added time. A local cell that calls ``Client.run_cell("pass")``
itself (the client the magics use, without the magic) is measured in the same alternation, and
``Client.run_cell("pass")`` is timed in a loop inside one cell, with no kernel messages around
it. The first row minus the ``%%mymps`` row is the cost of the magic layer. The loop row is the
cost of the remote call when it runs back to back.

The same run then shows what a cell's last value costs (issue 12): remote cells ending in a
256 MiB ``torch.nn.Linear``, in a 2x2 one, and in ``None``, alternately. The module stays on the
server (only its repr comes back), so the big one must cost no more than ``None`` plus its repr:
the mimebundle made on the server (timed there in a loop) and the ``execute_result`` the kernel
then shows, which the 2x2 module's cell has too. Size must not show: big minus small is noise.

Run: ``.venv/bin/python benchmarks/magic_overhead.py [--cells 200] [--warmup 20] [--value-cells 50]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import QUIET_ENV, ServerProcess

from notebook_kernel import Kernel

os.environ.update(QUIET_ENV)

TARGET_ADDED_MS = 1.0
LOCAL_CELL = "pass"
REMOTE_CELL = "%%mymps\npass"
CLIENT_CELL = "_mymps_client.run_cell('pass')"
REPLY_TIMEOUT_S = 30.0
BIG_SETUP = "%%mymps\nbig = torch.nn.Linear(8192, 8192)  # 256 MiB of float32\nsmall = torch.nn.Linear(2, 2)"
BIG_CELL = "%%mymps\nbig"
SMALL_CELL = "%%mymps\nsmall"
NONE_CELL = "%%mymps\nNone"
REPR_TIMING = ("import time\nfrom kernel_server.richrepr import mimebundle\n_s = time.perf_counter()\n"
               "for _ in range(100):\n    mimebundle(big)\n(time.perf_counter() - _s) / 100")
NOISE_MS = 0.1

# Runs inside the kernel: times the client call the magic makes, with no kernel messages around it.
_IN_KERNEL_TIMING = """
import time as _t
for _ in range({warmup}):
    _mymps_client.run_cell("pass")
_times = []
for _ in range({cells}):
    _s = _t.perf_counter()
    _mymps_client.run_cell("pass")
    _times.append(_t.perf_counter() - _s)
print(repr(_times))
"""


def machine_line() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"load average {load} at the start")


def event_loop(server: ServerProcess) -> str:
    """The server's event loop as its start line in server.log names it (uvloop where installed)."""
    for line in (server.home / "server.log").read_text(errors="replace").splitlines():
        if "event loop " in line:
            return line.rsplit("event loop ", 1)[1]
    return "not in server.log"


def round_trip(kernel: Kernel, code: str) -> float:
    """Seconds from sending the cell until its reply and the kernel's idle status are both in."""
    kc = kernel.client
    start = time.perf_counter()
    msg_id = kc.execute(code)
    reply: dict[str, Any] | None = None
    idle = False
    while reply is None:
        msg = kc.get_shell_msg(timeout=REPLY_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") == msg_id:
            reply = msg
    while not idle:
        msg = kc.get_iopub_msg(timeout=REPLY_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "error":
            raise RuntimeError(f"{code!r} failed: {msg['content']['ename']}: {msg['content']['evalue']}")
        idle = kind == "status" and msg["content"]["execution_state"] == "idle"
    elapsed = time.perf_counter() - start
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content']}")
    return elapsed


def stats_ms(seconds: list[float]) -> tuple[float, float, float]:
    ms = sorted(s * 1e3 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))], ms[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200, help="cells of each kind that are measured")
    parser.add_argument("--warmup", type=int, default=20, help="cells of each kind run first, not measured")
    parser.add_argument("--value-cells", type=int, default=100, help="cells ending in each module, and in None")
    args = parser.parse_args()

    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "home") as server:
        print(f"server event loop: {event_loop(server)}", flush=True)
        kernel = Kernel(Path(tmp) / "kernel", env={
            "MYMPS_SERVER_HOST": server.host, "MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token,
        })
        try:
            round_trip(kernel, "%load_ext mymps_magic")
            round_trip(kernel, '_mymps_client = get_ipython().magics_manager.registry["MympsMagics"].connected')
            cells: dict[str, list[float]] = {LOCAL_CELL: [], REMOTE_CELL: [], CLIENT_CELL: []}
            for i in range(args.warmup + args.cells):  # alternated: drift in the machine's load hits all
                for code, times in cells.items():
                    elapsed = round_trip(kernel, code)
                    if i >= args.warmup:
                        times.append(elapsed)
            client_run = kernel.execute(_IN_KERNEL_TIMING.format(warmup=args.warmup, cells=args.cells), timeout=300)
            if client_run.status != "ok":
                raise RuntimeError(f"the in-kernel timing failed: {client_run.error}")
            in_kernel = [float(x) for x in client_run.stdout.strip().strip("[]").split(",")]
            round_trip(kernel, BIG_SETUP)
            values: dict[str, list[float]] = {BIG_CELL: [], SMALL_CELL: [], NONE_CELL: []}
            for i in range(args.warmup + args.value_cells):
                for code, times in values.items():
                    elapsed = round_trip(kernel, code)
                    if i >= args.warmup:
                        times.append(elapsed)
            repr_s = kernel.execute(f"_mymps_client.run_cell({REPR_TIMING!r})", timeout=60).result
            if repr_s is None:
                raise RuntimeError("the repr timing gave no value")
            repr_ms = float(repr_s["text/plain"]) * 1e3
        finally:
            kernel.close()

    print(f"\nempty cell round trip in one kernel, {args.cells} cells of each kind after {args.warmup} "
          "warm-up (milliseconds):")
    print(f"  {'':46} {'median':>8} {'p99':>8} {'max':>8}")
    rows = [("local cell (pass)", cells[LOCAL_CELL]), ("%%mymps cell (pass)", cells[REMOTE_CELL]),
            ("local cell calling Client.run_cell('pass')", cells[CLIENT_CELL]),
            ("Client.run_cell('pass') in a loop in one cell", in_kernel)]
    medians = {}
    for name, seconds in rows:
        med, p99, top = stats_ms(seconds)
        medians[name] = med
        print(f"  {name:46} {med:8.2f} {p99:8.2f} {top:8.2f}")
    added = medians["%%mymps cell (pass)"] - medians["local cell (pass)"]
    ok = "met" if added < TARGET_ADDED_MS else "NOT met"
    print(f"\nadded by %%mymps at the median: {added:.2f} ms (target: under {TARGET_ADDED_MS:g} ms: {ok})")

    print(f"\na cell's last value, {args.value_cells} cells of each after {args.warmup} warm-up (milliseconds):")
    print(f"  {'':46} {'median':>8} {'p99':>8} {'max':>8}")
    value_medians = {}
    for name, code in (("%%mymps cell ending in a 256 MiB Linear", BIG_CELL),
                       ("%%mymps cell ending in a 2x2 Linear", SMALL_CELL),
                       ("%%mymps cell ending in None", NONE_CELL)):
        med, p99, top = stats_ms(values[code])
        value_medians[code] = med
        print(f"  {name:46} {med:8.2f} {p99:8.2f} {top:8.2f}")
    print(f"  {'its mimebundle, made on the server':46} {repr_ms:8.3f}")
    shown = value_medians[SMALL_CELL] - value_medians[NONE_CELL]
    extra = value_medians[BIG_CELL] - value_medians[NONE_CELL]
    ok = "met" if extra <= shown + repr_ms + NOISE_MS else "NOT met"
    print(f"\nthe 256 MiB module's cell costs {extra:.2f} ms more than None's at the median; showing a repr costs "
          f"{shown:.2f} ms (2x2 module minus None) plus {repr_ms:.3f} ms to make it (target: no more than that, "
          f"within {NOISE_MS:g} ms of noise: {ok})")


if __name__ == "__main__":
    main()
