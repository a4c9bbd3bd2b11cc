"""The client under faults and in plain scripts (issue 10): functions that reach a local module
only from nested code, remote errors outside IPython, and token hints that name the real file.

Scripts run in a fresh interpreter (a subprocess) so that what they import, print and raise is
what a user running ``python script.py`` would see.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kit import REPO_ROOT, ServerProcess
from mymps_magic import AuthError, Client

SCRIPT_TIMEOUT_S = 120.0


def run_script(directory: Path, source: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as ``directory/main.py`` (its directory first on the path, as for any
    script), with the repository importable and no ``MYMPS_*`` setting of ours."""
    script = directory / "main.py"
    script.write_text(textwrap.dedent(source))
    environ = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    environ.update(env or {})
    return subprocess.run([sys.executable, str(script), *args], cwd=directory, env=environ,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)


def test_a_local_module_used_only_in_a_comprehension_or_lambda_travels_by_value(
        server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "mylocal.py").write_text("def helper(x):\n    return x * 10\n")
    out = run_script(tmp_path, """
        import sys
        import mylocal
        from mymps_magic import Client

        def in_comprehension(xs):
            return [mylocal.helper(x) for x in xs]

        def in_lambda(xs):
            return list(map(lambda x: mylocal.helper(x), xs))

        with Client(port=int(sys.argv[1]), token=sys.argv[2]) as c:
            print(c.run(in_comprehension, [1, 2]), c.run(in_lambda, [3]))
    """, str(server.port), server.token)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[10, 20] [30]"


def test_a_remote_error_in_a_plain_script_shows_the_remote_frames_and_a_class_that_exists(
        server: ServerProcess, tmp_path: Path) -> None:
    out = run_script(tmp_path, """
        import sys
        import mymps_magic.remote
        from mymps_magic import Client

        def divide(x):
            return x / 0

        with Client(port=int(sys.argv[1]), token=sys.argv[2]) as c:
            try:
                c.run_cell("import json\\njson.loads('{')")
            except mymps_magic.remote.JSONDecodeError as exc:
                print("caught", type(exc).__qualname__, file=sys.stderr)
            c.run(divide, 1)
    """, str(server.port), server.token)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "caught JSONDecodeError"  # the printed path names a class one can catch
    assert lines[-1] == "mymps_magic.remote.ZeroDivisionError: division by zero"
    remote = out.stderr[:out.stderr.index("The above exception")]
    assert f'File "{tmp_path / "main.py"}", line 7, in divide' in remote
    assert "return x / 0" in remote and "ZeroDivisionError: division by zero" in remote


def test_token_hints_name_the_token_file_the_client_reads_and_the_servers_reason(
        server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "elsewhere"
    monkeypatch.delenv("MYMPS_TOKEN", raising=False)
    monkeypatch.delenv("MYMPS_TOKEN_FILE", raising=False)
    monkeypatch.setenv("MYMPS_HOME", str(home))
    with Client(port=server.port) as nothing, pytest.raises(AuthError) as missing:
        nothing.models()
    with Client(port=server.port, token="not-the-token") as wrong:
        with pytest.raises(AuthError) as refused:
            wrong.models()
        with pytest.raises(AuthError) as refused_session:
            wrong.run_cell("1")
    for error in (missing.value, refused.value, refused_session.value):
        line = str(error)
        assert str(home / "token") in line and "~/.mymps" not in line and "\n" not in line
        assert "not-the-token" not in line
    for error in (missing.value, refused.value):  # a refused WebSocket handshake carries no body
        assert "The server says: missing or wrong token" in str(error)  # its own reason, kept
