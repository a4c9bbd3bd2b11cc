"""The `mymps` command: verbs dispatch, `serve` passes its options through, the demo runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kit import QUIET_ENV, REPO_ROOT
from mymps_magic.cli import main


def test_a_verb_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "demo" in out


def test_serve_passes_its_options_to_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    # --help reaches the server's own parser, which names itself `mymps serve`.
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "mymps serve" in out and "--port" in out


def test_demo_rejects_unknown_arguments() -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--fast"])
    assert info.value.code == 2


@pytest.mark.slow
def test_demo_runs_end_to_end() -> None:
    # The README's first command: a tiny model, a real server, load, generate, stream, stop.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from mymps_magic.cli import main; sys.exit(main(['demo']))"],
        capture_output=True, text=True, timeout=240, cwd=REPO_ROOT, env={**env, **QUIET_ENV},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens/s" in out.stdout
    assert out.stdout.rstrip().endswith("Stopped the server.")


def test_serve_help_and_bad_options_answer_without_loading_torch() -> None:
    """`mymps serve --help` (and a bad option) must not wait for torch and FastAPI to import."""
    probe = ("import sys\nfrom mymps_magic.cli import main\n"
             "try:\n    main(['serve', '--port', 'not-a-port'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **QUIET_ENV}, cwd=REPO_ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert "not-a-port" in out.stderr
