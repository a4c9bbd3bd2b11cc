"""Real IPython kernels for tests: started with jupyter_client, driven by execute requests.

A test sees what a notebook would: the iopub messages (``stream``, ``display_data``,
``execute_result``, ``error``) of each cell, in order, with the time each arrived.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kit import QUIET_ENV, REPO_ROOT, TESTS_DIR, ServerProcess


@dataclass
class CellRun:
    """What one executed cell produced, as the notebook front end receives it."""

    reply: dict[str, Any]
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    reply_at: float = 0.0
    interrupted_at: float = 0.0

    def of_type(self, *kinds: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["header"]["msg_type"] in kinds]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stderr")

    @property
    def status(self) -> str:
        return str(self.reply["content"]["status"])

    @property
    def result(self) -> dict[str, Any] | None:
        results = self.of_type("execute_result")
        return results[-1]["content"]["data"] if results else None

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[-1]["content"] if errors else None


class Kernel:
    """A real ``python3`` kernel from this venv, in temporary Jupyter/IPython directories."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, spec: Path | None = None) -> None:
        """``spec``: a kernelspec folder (``.../kernels/NAME``) to start instead of this venv's python3."""
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        dirs = {name: home / name for name in ("runtime", "data", "config", "ipython", "mpl")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MYMPS_")}
        environment.update(QUIET_ENV)
        environment.update({
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]), "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_CONFIG_DIR": str(dirs["config"]), "IPYTHONDIR": str(dirs["ipython"]),
            "MPLCONFIGDIR": str(dirs["mpl"]), "MPLBACKEND": "agg",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
        })
        environment.update(env or {})
        # IPC socket paths must stay under ~100 characters: a pytest tmp_path is too deep for them.
        self._sockets = tempfile.mkdtemp(prefix="mymps-k", dir="/tmp")
        # jupyter_client 8 ignores kernel_cmd: another venv's kernel is started through its own kernelspec.
        specs = KernelSpecManager(kernel_dirs=[str(spec.parent)]) if spec else KernelSpecManager()
        self.manager = KernelManager(kernel_name=spec.name if spec else "python3", kernel_spec_manager=specs,
                                     transport="ipc", ip=os.path.join(self._sockets, "k"))
        if spec is None:
            self.manager.kernel_spec.argv[0] = sys.executable
        self.manager.start_kernel(env=environment, cwd=str(home))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 60, interrupt_after: float | None = None,
                interrupt_when: Callable[[CellRun], bool] | None = None) -> CellRun:
        """Run a cell and collect its iopub messages until the kernel is idle again.

        ``interrupt_after`` presses the stop button (SIGINT to the kernel) that many seconds in;
        ``interrupt_when`` presses it once the cell's messages so far satisfy it (e.g. the first
        output came), which a busy machine cannot outrun the way it can a fixed delay.
        """
        msg_id = self.client.execute(code)
        run = CellRun(reply={})
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        interrupted = interrupt_after is None and interrupt_when is None
        idle = False
        while not (idle and run.reply):
            due = (time.monotonic() - started >= interrupt_after if interrupt_after is not None
                   else interrupt_when is not None and interrupt_when(run))
            if not interrupted and due:
                self.manager.interrupt_kernel()
                interrupted, run.interrupted_at = True, time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cell did not finish in {timeout} s: {code[:80]!r}")
            try:
                msg = self.client.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                kind = msg["header"]["msg_type"]
                if kind == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    run.messages.append((time.monotonic(), msg))
            if not run.reply:
                try:
                    reply = self.client.get_shell_msg(timeout=0)
                except queue.Empty:
                    continue
                if reply["parent_header"].get("msg_id") == msg_id:
                    run.reply, run.reply_at = reply, time.monotonic()
        return run

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
        shutil.rmtree(self._sockets, ignore_errors=True)


def ok(run: CellRun) -> CellRun:
    """The run of a cell that must have succeeded."""
    assert run.status == "ok", (run.error, run.stderr)
    return run


@contextlib.contextmanager
def notebook(directory: Path, server: ServerProcess) -> Iterator[Kernel]:
    """A kernel with ``%load_ext mymps_magic`` done, whose ``%mymps`` reaches ``server`` by default."""
    kernel = Kernel(directory, env={"MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token})
    try:
        ok(kernel.execute("%load_ext mymps_magic"))
        yield kernel
    finally:
        kernel.close()
