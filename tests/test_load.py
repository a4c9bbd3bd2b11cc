"""``benchmarks/load.py`` at CI size (issue 16, item 5): 4 sessions x 50 ``run`` calls of varied
sizes, 2 streaming generations and the ``/health`` poller, plain and then with the sessions'
connections cut several times a second by the proxy. Every call answered once with its value,
none run twice, no error, and the server's memory back within 10% after each phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_load_loses_nothing_plain_and_with_the_link_cut(tmp_path: Path) -> None:
    figures = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/load.py", "--sessions", "4", "--calls", "50", "--streams", "2", "--tokens", "32",
         "--cut-every", "0.1", "0.3", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    plain, cut = json.loads(figures.read_text())
    for phase in (plain, cut):
        assert phase["answered"] == 4 * 50, output
        assert (phase["wrong"], phase["errors"], phase["ran_twice"], phase["never_ran"]) == (0, 0, 0, 0), output
        assert phase["streams"] == 2 and phase["stream_tokens"] == 64, output
        assert phase["health_n"] > 0 and phase["health_median_ms"] <= phase["health_p99_ms"], output
        assert phase["rss_after_mib"] <= 1.1 * phase["rss_before_mib"], output
        assert phase["failures"] == [], output
    assert cut["cuts"] >= 2 and cut["connections"] > 4, output  # the link really was cut and reopened
    assert "| cut | 200 of 4 x 50 | 0 / 0 / 0 / 0 |" in done.stdout
