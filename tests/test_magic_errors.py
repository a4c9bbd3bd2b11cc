"""Errors a user can cause, as a real Jupyter kernel shows them (SPEC 6, STYLE habits 2 and 3).

Each one must reach the notebook as ONE line that says what to do: the iopub ``error`` message's
traceback is that single line, with no client-side frames. An exception raised by the user's own
remote code shows its remote traceback instead, trimmed of server frames.

The module's kernel talks to the shared ``server``; tests whose client must be broken from the
start (nothing listening, a refused token, a faked Python version) get a kernel of their own.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Callable

import pytest

from notebook_kernel import CellRun, Kernel, ok
from kit import ServerProcess
from mymps_magic.cli.localserver import free_port

CLIENT_FRAMES = ("mymps_magic", "_session.py", "_stream.py", "magics.py", "client.py", "site-packages",
                 "websockets", "kernel_server", "Traceback (most recent call last)")
SERVER_FRAMES = ("kernel_server", "site-packages", "/lib/python3")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def traceback_lines(run: CellRun) -> list[str]:
    assert run.status == "error", f"the cell should have failed: {run.stdout!r} {run.stderr!r}"
    assert run.error is not None, "an error message on iopub"
    return [ANSI.sub("", line) for chunk in run.error["traceback"] for line in chunk.splitlines()]


def one_line(run: CellRun, ename: str) -> str:
    """The single line the notebook shows for a `MympsError` named ``ename``."""
    lines = traceback_lines(run)
    assert run.error is not None and run.error["ename"] == ename, run.error
    assert len(lines) == 1, "one line, not a stack dump:\n" + "\n".join(lines)
    line = lines[0]
    assert line.startswith(f"{ename}: ")
    for word in CLIENT_FRAMES:
        assert word not in line, line
    return line


# -- the server cannot be reached, or refuses the token ----------------------------------------------


def test_unreachable_server_is_one_line_saying_how_to_start_it(own_kernel: Callable[..., Kernel]) -> None:
    port = free_port()
    kernel = own_kernel(MYMPS_SERVER_PORT=str(port), MYMPS_TOKEN="some-token")
    for code in ("%mymps models", "%mymps health", "%%mymps\n1 + 1", "%mymps pull x", "%mymps generate m 'p'"):
        line = one_line(kernel.execute(code, timeout=30), "ConnectionError")
        assert f"127.0.0.1:{port}" in line, line
        assert "mymps tunnel" in line and "mymps serve" in line, f"{code}: says how to start them: {line}"


def test_failed_connect_is_one_line_and_keeps_the_working_client(nb: Kernel, server: ServerProcess) -> None:
    ok(nb.execute("%%mymps\nkept_across_connect = 'yes'"))
    port = free_port()
    line = one_line(nb.execute(f"%mymps connect 127.0.0.1:{port}"), "ConnectionError")
    assert f"127.0.0.1:{port}" in line and "mymps tunnel" in line and "mymps serve" in line
    status = ok(nb.execute("%mymps status")).of_type("display_data")[-1]["content"]["data"]["text/plain"]
    assert status.startswith(f"Server  127.0.0.1:{server.port}  "), status
    assert ok(nb.execute("%%mymps\nkept_across_connect")).result == {"text/plain": "'yes'"}


def test_wrong_token_is_one_line_naming_where_it_came_from(own_kernel: Callable[..., Kernel], server: ServerProcess) -> None:
    secret = "wrong-token-do-not-print-7f3a"
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=secret)
    ok(kernel.execute("wt_local = 1"))
    for code in ("%mymps models", "%mymps stats", "%%mymps\n1 + 1", "%mymps push wt_local", "%mymps load x"):
        run = kernel.execute(code, timeout=30)
        line = one_line(run, "AuthError")
        assert "MYMPS_TOKEN" in line and "token" in line, line
        assert secret not in run.stdout + run.stderr + line, "the token must never be printed"
    # /health needs no token, so the user can still see the server is up.
    assert ok(kernel.execute("%mymps health")).stdout.startswith("ok  mymps ")


def test_connect_with_a_refused_token_fails_at_once(own_kernel: Callable[..., Kernel], server: ServerProcess) -> None:
    """``%mymps connect`` must not say "Connected" with a token the server refuses: the user would
    learn it only at the next command. (It checks /health, which needs no token.)"""
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    run = kernel.execute(f"%mymps connect 127.0.0.1:{server.port} --token not-the-token")
    line = one_line(run, "AuthError")
    assert "refused" in line and "Connected" not in run.stdout
    # The working client is kept, as when the server cannot be reached.
    assert ok(kernel.execute("%%mymps\n'still connected'")).result == {"text/plain": "'still connected'"}


def test_connect_with_a_token_file_names_that_file_when_refused_or_missing(
    own_kernel: Callable[..., Kernel], server: ServerProcess, tmp_path: Path
) -> None:
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    stale = tmp_path / "stale-token"
    stale.write_text("an-old-token-do-not-print\n")
    refused = one_line(kernel.execute(f"%mymps connect 127.0.0.1:{server.port} --token-file {shlex.quote(str(stale))}"),
                       "AuthError")
    assert "refused" in refused and str(stale) in refused and "an-old-token" not in refused, refused
    missing = one_line(kernel.execute(f"%mymps connect 127.0.0.1:{server.port} --token-file {tmp_path / 'absent'}"),
                       "AuthError")
    assert f"{tmp_path / 'absent'} does not exist" in missing, missing


# -- models, names and pickling ----------------------------------------------------------------------


def test_unknown_model_is_one_line_listing_the_loaded_ones(nb: Kernel, llama: str) -> None:
    for code in ("%mymps generate no-such-model 'hi'", "%mymps generate no-such-model 'hi' --no-stream",
                 "%mymps image no-such-model 'a fox' --steps 2", "%mymps unload no-such-model"):
        line = one_line(nb.execute(code), "NotFoundError")
        assert "'no-such-model'" in line and llama in line, f"{code}: {line}"


@pytest.mark.parametrize("code, ename, says", [
    ("%mymps load /nonexistent/model-dir", "NotFoundError", "'/nonexistent/model-dir' does not exist on the server"),
    ("%mymps load errors-x --kind weird", "BadRequestError", "'text', 'diffusion', 'auto', 'torchscript' or 'checkpoint'"),
    ("%mymps load errors-x --dtype float7", "BadRequestError", "'float16', 'bfloat16', 'half'"),
    ("%mymps generate errors-x 'p' --max-new-tokens 0", "BadRequestError", "max_new_tokens"),
])
def test_arguments_the_server_rejects_are_one_line(nb: Kernel, code: str, ename: str, says: str) -> None:
    assert says in one_line(nb.execute(code), ename)


def test_pull_of_a_name_not_defined_remotely(nb: Kernel) -> None:
    for code in ("%mymps pull never_defined_remotely", "%%mymps --pull never_defined_remotely\npulled_ran = 1"):
        line = one_line(nb.execute(code), "RemoteNameError")
        assert "'never_defined_remotely' is not defined in the remote session" in line
        assert "push" in line, "says what to do"
    assert "never_defined_remotely" not in ok(nb.execute("print(dir())")).stdout


def test_unpicklable_push_names_the_object_and_runs_nothing(nb: Kernel) -> None:
    ok(nb.execute("import threading\nlock = threading.Lock()"))
    for code in ("%%mymps --push lock\nran_after_bad_push = True", "%mymps push lock"):
        line = one_line(nb.execute(code), "PicklingError")
        assert "'lock'" in line and "%%mymps" in line and "plain data" in line, line
    assert ok(nb.execute("%%mymps\n'ran_after_bad_push' in dir()")).result == {"text/plain": "False"}


def test_unpicklable_pull_says_to_keep_it_remote(nb: Kernel) -> None:
    ok(nb.execute("%%mymps\nimport threading\nremote_lock = threading.Lock()"))
    for code in ("%mymps pull remote_lock", "%%mymps --pull remote_lock\n1"):
        line = one_line(nb.execute(code), "PicklingError")
        assert "'remote_lock'" in line and "remote" in line and "plain data" in line, line


def test_python_version_mismatch_is_one_line_and_cells_still_work(own_kernel: Callable[..., Kernel],
                                                                  server: ServerProcess) -> None:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"  # the server's: same interpreter
    kernel = own_kernel("import mymps_magic.wire.frames as w\nw.PYTHON_VERSION = '3.8'",
                        MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    first = ok(kernel.execute("%%mymps\nprint('cells work')\n6 * 7"))
    assert first.stdout == "cells work\n" and first.result == {"text/plain": "42"}
    assert "Python 3.8" in first.stderr and f"Python {here}" in first.stderr, "a warning when the session opens"

    run = kernel.execute("_m = get_ipython().magics_manager.registry['MympsMagics']\n_m.connected.run(len, [1])")
    line = one_line(run, "VersionMismatchError")
    assert "Python 3.8" in line and f"Python {here}" in line, "names both versions"
    assert f"Use Python {here}" in line, "says what to do"

    ok(kernel.execute("vm_data = [1, 2]"))
    ok(kernel.execute("%mymps push vm_data"))
    ok(kernel.execute("%%mymps --pull vm_sum\nvm_sum = sum(vm_data)"))
    assert ok(kernel.execute("print(vm_sum)")).stdout == "3\n", "plain data still crosses"


# -- the user's own remote errors --------------------------------------------------------------------


def test_remote_exception_shows_the_trimmed_remote_traceback(nb: Kernel) -> None:
    lines = traceback_lines(nb.execute("%%mymps\ndef divide():\n    return 1 / 0\ndivide()"))
    text = "\n".join(lines)
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert "line 3, in <module>" in text and "line 2, in divide" in text and "return 1 / 0" in text
    for word in SERVER_FRAMES + ("mymps_magic",):
        assert word not in text, f"{word} in the remote traceback:\n{text}"


def test_remote_syntax_error_shows_no_server_frames(nb: Kernel) -> None:
    lines = traceback_lines(nb.execute("%%mymps\nok_line = 1\nbroken = (\n"))
    text = "\n".join(lines)
    assert lines[-1].startswith("SyntaxError: "), text
    assert "<mymps-cell-" in text
    for word in SERVER_FRAMES:
        assert word not in text, f"a server frame ({word}) in the syntax error:\n{text}"


def test_stop_button_during_generate_stops_it_without_a_client_stack(nb: Kernel, llama: str) -> None:
    """Pressed once the first tokens show (a fixed delay can come before them on a busy machine),
    the stop button ends the cell with the job already gone from the server's /jobs."""
    run = nb.execute(f"%mymps generate {llama} 'Machine learning' --temperature 0 --max-new-tokens 8000",
                     timeout=120, interrupt_when=lambda cell: bool(cell.stdout))
    assert run.interrupted_at, "the first tokens came, and the stop button was pressed"
    assert run.reply_at - run.interrupted_at < 20, "the stop button ends the cell within seconds, not 8000 tokens later"
    assert run.stdout, "the text generated so far stays in the cell"
    jobs = ok(nb.execute("%mymps jobs")).stdout
    assert not any(llama in line for line in jobs.splitlines()), f"the generation stopped on the server too: {jobs}"
    if run.status == "error":  # stopping may end the cell as an error, but not as a stack of client frames
        text = "\n".join(traceback_lines(run))
        for word in CLIENT_FRAMES:
            assert word not in text, f"client-side frames ({word}) after the stop button:\n{text}"
