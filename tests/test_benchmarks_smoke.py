"""``python -m benchmarks --smoke``: every benchmark still runs, at tiny sizes, and reports into
the one table (the figures of such a run measure nothing). One run per benchmark, as
``--only NAME``, so that each stays well inside a test's time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["noop_roundtrip", "push_pull", "health_during_generation", "magic_overhead", "concurrent_clients",
           "backlog_replay", "chat_rate", "tunnel_latency"]
"""Every script the runner runs but ``load``, which tests/test_load.py runs at this size already."""


def _table(name: str) -> tuple[dict[str, str], str]:
    """The table rows of ``python -m benchmarks --smoke --only name`` by figure, and its output."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", name], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    return rows, output


def test_the_generation_benchmark_reports_its_rows() -> None:
    rows, output = _table("generation_rate")
    assert "| yes |" in rows["tiny: greedy text of `POST /generate` = in-process, same path"], output
    assert "tok/s" in rows["tiny: server `/ws/generate`"], output
    assert "tok/s" in rows["tiny: 2 clients streaming at once, aggregate"], output


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_runs_into_the_table(name: str) -> None:
    rows, output = _table(name)
    assert name in rows and "failed" not in rows[name], output
