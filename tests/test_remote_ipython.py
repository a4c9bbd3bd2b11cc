"""IPython syntax in remote cells (issue 12 item 2): the server runs each cell through IPython's
own machinery (input transformers, line and cell magics, the display hook), in the session's
namespace, one device job at a time.

Driven through `Client.run_cell`/`submit_cell` (what ``%%mymps`` calls) on the shared server;
`submit_cell` keeps a cell's output as it arrives, so a test can see what came while it runs.
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mymps_magic import Client, RemoteError
from mymps_magic._cellfuture import CellFuture

PATIENCE_S = 30.0


def _stdout(future: CellFuture) -> str:
    return "".join(text for kind, text in future.outputs if kind == "stdout")


def _wait_for_output(future: CellFuture, needle: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while needle not in _stdout(future):
        assert not future.done(), f"the cell ended without printing {needle!r}: {future.outputs!r}"
        assert time.monotonic() < deadline, f"{needle!r} never arrived; so far {future.outputs!r}"
        future.kept.wait_for_more(len(future.kept.items), 0.2)


@pytest.fixture
def c(client: Client) -> Iterator[Client]:
    client.reset()
    yield client


def test_a_shell_command_streams_its_output_live(c: Client, tmp_path: Path) -> None:
    go = tmp_path / "go"
    running = c.submit_cell(f"!echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second")
    _wait_for_output(running, "first")
    assert "second" not in _stdout(running)  # the command still waits for the file
    go.touch()
    assert running.result(timeout=PATIENCE_S) is None
    assert _stdout(running).replace("\r\n", "\n") == "first\nsecond\n"
    assert c.run_cell(f"files = !ls {go.parent}\nlist(files)") == ["go"]  # captured, as IPython does


def test_line_magics_time_timeit_who_env(c: Client, capsys: pytest.CaptureFixture[str]) -> None:
    c.run_cell("%time total = sum(range(10))")
    assert "Wall time" in capsys.readouterr().out
    c.run_cell("%timeit -n 1 -r 1 sum(range(10))")
    assert "per loop" in capsys.readouterr().out
    c.push(pushed=1)
    c.run_cell("alpha = 1\nbeta = 'b'\n%who")
    assert capsys.readouterr().out.split() == ["alpha", "beta", "pushed", "total"]  # none of DEVICE, models...
    c.run_cell("%env MYMPS_REMOTE_PROBE=yes")
    assert c.run_cell("%env MYMPS_REMOTE_PROBE") == "yes"
    assert c.run_cell("import os\nos.environ['MYMPS_REMOTE_PROBE']") == "yes"
    assert "MYMPS_REMOTE_PROBE" not in os.environ  # set on the server, not here


def test_get_ipython_is_the_sessions_shell(c: Client) -> None:
    assert c.run_cell("ip = get_ipython()\nip.user_ns is globals(), type(ip).__name__") == (True, "RemoteShell")
    assert c.run_cell("ip.run_line_magic('who_ls', '')") == ["ip"]
    assert c.run_cell("In[-1]") == "In[-1]"  # the session's input history


def test_pip_runs_in_the_servers_environment(c: Client, capsys: pytest.CaptureFixture[str]) -> None:
    c.run_cell("%pip --version")
    out = capsys.readouterr().out
    assert out.startswith("pip ") and str(Path(sys.prefix)) in out, out  # the test server shares this venv
    # No kernel to restart there: the note says what holds for the server instead.
    assert "restart the kernel" not in out, out
    assert "already imported keep their old version until the server restarts" in out.replace("\n", " "), out


@pytest.mark.slow
def test_pip_install_installs_on_the_server(c: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"mymps_probe_{os.getpid()}"
    wheel = _tiny_wheel(tmp_path, name)
    try:
        c.run_cell(f"%pip install --no-index --no-deps {wheel}")
        assert f"Successfully installed {name.replace('_', '-')}-0.1" in capsys.readouterr().out
        assert c.run_cell(f"import {name}\n{name}.ANSWER") == 42
    finally:
        c.run_cell(f"%pip uninstall -y {name}")


def _tiny_wheel(directory: Path, name: str) -> Path:
    """A wheel of one module, written by hand: no build backend, no network."""
    path = directory / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {f"{name}.py": "ANSWER = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


@pytest.mark.parametrize("cell", ["%debug", "%%html\n<b>x</b>", "%mymps status"])
def test_what_is_not_supported_says_so_in_one_line(c: Client, cell: str) -> None:
    with pytest.raises(RemoteError) as info:
        c.run_cell(cell)
    assert info.value.ename == "UsageError" and "not supported in a remote cell" in str(info.value)
    assert "\n" not in str(info.value) and len(info.value.traceback) == 1
    assert c.run_cell("1 + 1") == 2


def test_errors_keep_their_remote_traceback(c: Client) -> None:
    with pytest.raises(RemoteError) as info:
        c.run_cell("def f():\n    return 1 / 0\n%time f()")
    text = "".join(info.value.traceback)
    assert info.value.ename == "ZeroDivisionError" and "return 1 / 0" in text and "<mymps-cell-" in text
    assert "IPython" not in text and "kernel_server" not in text


def test_the_stop_button_interrupts_a_shell_command(c: Client) -> None:
    running = c.submit_cell("!echo started; sleep 30\nprint('after')")
    _wait_for_output(running, "started")
    c.interrupt()
    with pytest.raises(RemoteError) as info:  # as in ipykernel: the command stops, so does the cell
        running.result(timeout=PATIENCE_S)
    assert info.value.ename == "KeyboardInterrupt"
    assert "after" not in _stdout(running)


def test_who_lists_names_pushed_before_the_first_cell(c: Client, capsys: pytest.CaptureFixture[str]) -> None:
    c.push(early=1)  # the session's shell does not exist yet: it is made by the first cell
    c.run_cell("%who")
    assert capsys.readouterr().out.split() == ["early"]
