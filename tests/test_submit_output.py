"""The output of a submitted call goes under the cell that submitted it, and its future keeps it
(issue 12, item 4), in a real Jupyter kernel against the real server.

The call is held on the server by a gate (a file the test creates) while another cell runs, so
the output it prints after the gate opens arrives while that other cell is the current one.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest
from notebook_kernel import Kernel

from mymps_magic import Client

PATIENCE_S = 60.0


class Iopub:
    """Every iopub message of a kernel, whichever cell it belongs to, in the order they came.

    (`Kernel.execute` keeps only the messages of the cell it runs; output that belongs to an
    earlier cell is what this test is about.)
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.messages: list[dict[str, Any]] = []

    def _read(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg: dict[str, Any] = self.kernel.client.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.messages.append(msg)
        return msg

    def execute(self, code: str) -> str:
        """Run a cell that must succeed, until its reply came and the kernel is idle; its msg_id."""
        msg_id: str = self.kernel.client.execute(code)
        deadline = time.monotonic() + PATIENCE_S
        reply: dict[str, Any] | None = None
        idle = False
        while not (idle and reply):
            assert time.monotonic() < deadline, f"the cell did not finish: {code[:80]!r}"
            msg = self._read(0.05)
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                idle = msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
            if reply is None:
                try:
                    answer = self.kernel.client.get_shell_msg(timeout=0)
                except queue.Empty:
                    continue
                if answer["parent_header"].get("msg_id") == msg_id:
                    reply = answer
        assert reply["content"]["status"] == "ok", (reply["content"], self.stdout(msg_id))
        return msg_id

    def under(self, msg_id: str, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages
                if m["parent_header"].get("msg_id") == msg_id and m["header"]["msg_type"] == kind]

    def stdout(self, msg_id: str) -> str:
        return "".join(m["content"]["text"] for m in self.under(msg_id, "stream") if m["content"]["name"] == "stdout")

    def everywhere(self) -> str:
        """The text of every stream and display message, whichever cell it came under."""
        return "".join(m["content"].get("text", "") + m["content"].get("data", {}).get("text/plain", "")
                       for m in self.messages if m["header"]["msg_type"] in ("stream", "display_data"))

    def displays(self, msg_id: str) -> list[str]:
        return [m["content"]["data"].get("text/plain", "") for m in self.under(msg_id, "display_data")]

    def wait_until(self, done: Any) -> None:
        """Read on until ``done()`` holds: output of an earlier cell may come after the last one ended."""
        deadline = time.monotonic() + PATIENCE_S
        while not done():
            assert time.monotonic() < deadline, [m["content"] for m in self.messages if m["header"]["msg_type"] != "status"]
            self._read(0.05)


def test_a_submitted_call_prints_under_the_cell_that_submitted_it(nb: Kernel, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    iopub = Iopub(nb)
    cell_a = iopub.execute(
        "from mymps_magic import Client\n"
        "so_client = Client()\n"
        "def so_work(gate):\n"
        "    import os, time\n"
        "    print('first from A', flush=True)\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not os.path.exists(gate) and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    print('second from A', flush=True)\n"
        "    display('display from A')\n"
        "    return 'done'\n"
        f"so_future = so_client.submit(so_work, {str(gate)!r})\n")
    # Cell B runs while the call waits; the call prints again only once B has opened the gate.
    cell_b = iopub.execute(
        "import pathlib, time\n"
        "deadline = time.monotonic() + 60\n"
        "while not so_future.running() and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        f"pathlib.Path({str(gate)!r}).touch()\n"
        "print('B got', so_future.result(timeout=60))\n")
    iopub.wait_until(lambda: "'display from A'" in iopub.everywhere())
    assert iopub.stdout(cell_a) == "first from A\nsecond from A\n"
    assert iopub.displays(cell_a) == ["'display from A'"]
    assert iopub.stdout(cell_b) == "B got done\n"
    assert iopub.displays(cell_b) == []

    # The future keeps what it showed: a later cell shows it again, under itself.
    cell_c = iopub.execute("so_future.display_outputs()")
    iopub.wait_until(lambda: iopub.everywhere().count("'display from A'") == 2)
    assert iopub.stdout(cell_c) == "first from A\nsecond from A\n"
    assert iopub.displays(cell_c) == ["'display from A'"]
    assert iopub.stdout(cell_a) == "first from A\nsecond from A\n", "shown once more, not under A again"


def test_a_submitted_call_keeps_its_output_outside_a_kernel(client: Client,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """In a plain script the output shows on stdout/stderr as it comes, and the future keeps it."""
    future = client.submit(exec, "import sys\nprint('kept', flush=True)\nprint('err', file=sys.stderr, flush=True)")
    assert future.result(timeout=PATIENCE_S) is None
    assert capsys.readouterr() == ("kept\n", "err\n")
    assert future.outputs == [("stdout", "kept\n"), ("stderr", "err\n")]
    future.display_outputs()
    assert capsys.readouterr() == ("kept\n", "err\n")
