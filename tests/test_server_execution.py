"""The server's process-wide hooks for user code (output routers, tqdm), with the real Execution."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import std

from kernel_server.capture import Execution, Outlet
from mymps_magic import wire


def bars_of(execution: Execution) -> list[dict[str, Any]]:
    """Run a tqdm loop as remote code would, and return the progress frames it sent."""
    frames: list[wire.Frame] = []
    with execution.capture(Outlet(frames.append, 1)):
        for _ in std.tqdm(range(3), desc="steps", mininterval=0):
            print("step")
    return [dict(f.fields) for f in frames if f.type == "progress"]


def test_a_second_execution_after_the_first_closed_keeps_progress_bars() -> None:
    """Two apps one after the other in one process (create_app twice): the second's bars still reach its client."""
    first = Execution()
    assert bars_of(first)[-1]["closed"] is True
    first.close()
    second = Execution()
    try:
        bars = bars_of(second)
        assert bars and bars[-1]["n"] == 3 and bars[-1]["closed"] is True and bars[-1]["desc"] == "steps"
    finally:
        second.close()


def test_overlapping_executions_share_the_hooks_and_the_last_close_restores_them() -> None:
    original_stdout, original_init = sys.stdout, std.tqdm.__init__
    first, second = Execution(), Execution()
    first.close()
    try:
        assert bars_of(second)[-1]["n"] == 3, "closing the first must not unhook the second"
        assert isinstance(sys.stdout, type(second.stdout))
    finally:
        second.close()
    assert sys.stdout is original_stdout and std.tqdm.__init__ is original_init
