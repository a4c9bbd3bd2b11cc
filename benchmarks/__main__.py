"""``python -m benchmarks``: every SPEC 9 benchmark in one run, one table.

The generation benchmark (``generation_rate.py``) reports its rows into the table itself, on the
device and sizes asked for. The other scripts run as they do alone, one after the other (never
two at once: on a 2-core machine a second one doubles the first's latencies); their table row
counts the targets their output judges ``met`` and ``NOT met``, and their own lines follow the
table. ``--smoke`` runs everything at tiny sizes, to show each still runs (CI does), not to
measure.

    python -m benchmarks                                   # this machine's CPU, every benchmark
    python -m benchmarks --device cuda --sizes gpt2 tinyllama --only generation_rate
    python -m benchmarks --smoke
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generation_rate  # noqa: E402
from _machine import machine_line  # noqa: E402
from run import Row, device_line, table  # noqa: E402

SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "noop_roundtrip": ([], ["--calls", "20", "--warmup", "5", "--no-ipp"]),
    "push_pull": ([], ["--mib", "1", "--repeat", "1", "--warmup", "1"]),
    "health_during_generation": ([], ["--seconds", "2", "--calls", "5"]),
    "magic_overhead": ([], ["--cells", "5", "--warmup", "2", "--value-cells", "3"]),
    "concurrent_clients": ([], ["--seconds", "0.5"]),
    "backlog_replay": ([], ["--lines", "20000"]),
    "chat_rate": ([], ["--tokens", "4", "--runs", "1"]),
    "tunnel_latency": ([], ["--calls", "5", "--warmup", "2"]),
    "load": ([], ["--sessions", "4", "--calls", "50", "--streams", "2", "--tokens", "32", "--cut-every", "0.1", "0.3"]),
}
"""The scripts that print their own report: their arguments for a measurement, and for ``--smoke``."""

SMOKE = ["--sizes", "tiny", "--tokens", "8", "--runs", "1", "--clients", "2"]
_JUDGED = re.compile(r"\bNOT met\b|\bmet\b")


def run_script(name: str, args: list[str]) -> tuple[Row, str]:
    """Run ``benchmarks/<name>.py`` and count the targets its output judges; ``tunnel_latency``
    needs ``sshd`` and says so in its row where there is none."""
    if name == "tunnel_latency" and shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        return Row(name, "not run: needs openssh-server (scripts/dev.sh test installs it)"), ""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], capture_output=True, text=True,
                          cwd=HERE.parent)
    took = time.perf_counter() - start
    verdicts = _JUDGED.findall(done.stdout)
    missed = verdicts.count("NOT met")
    if done.returncode != 0:
        return Row(name, f"failed (exit {done.returncode})", status="NOT met"), done.stdout + done.stderr
    value = f"{len(verdicts) - missed} met, {missed} NOT met ({took:.0f} s; its lines below)"
    return Row(name, value, status="NOT met" if missed else ("met" if verdicts else "")), done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    generation_rate.add_options(parser)
    parser.add_argument("--only", nargs="+", choices=["generation_rate", *SCRIPTS], help="run only these")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that each benchmark runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args = parser.parse_args([*(argv or sys.argv[1:]), *SMOKE])
    chosen = args.only or ["generation_rate", *SCRIPTS]
    print(machine_line(), flush=True)
    rows: list[Row] = []
    reports: list[str] = []
    for name in chosen:
        if name == "generation_rate":
            rows += generation_rate.collect(args)
            continue
        row, output = run_script(name, SCRIPTS[name][1 if args.smoke else 0])
        rows.append(row)
        if output:
            reports.append(f"--- {name}\n{output.rstrip()}")
    print(device_line(args.device))
    if args.smoke:
        print("smoke run: tiny sizes show that each benchmark runs; its figures and statuses measure nothing")
    print(table(rows))
    for report in reports:
        print(report)
    return 1 if any(r.value.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
