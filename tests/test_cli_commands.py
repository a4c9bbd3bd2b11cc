"""The shell commands for people outside Jupyter (issue 13, item 4): `mymps status`, `models`, `load`,
`unload`, `jobs`, `cancel` and `generate`, run as a user runs them (a subprocess, the server found
through MYMPS_SERVER_HOST/PORT and MYMPS_TOKEN) against the real server; plus `mymps dashboard`'s
hand-over to the dashboard package.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from kit import QUIET_ENV, REPO_ROOT, ServerProcess, TinyModels
from mymps_magic import Client
from mymps_magic._humanize import ago, size
from mymps_magic.cli import SERVER_VERBS
from mymps_magic.cli.columns import table
from mymps_magic.cli.commands import VERBS

LLAMA = "cli-llama"
# Greedy decoding of this prompt on the tiny Llama loops without EOS: it runs to max_new_tokens.
LONG_PROMPT = "Machine learning"
SIZE = re.compile(r"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)\b")


def cli_env(server: ServerProcess, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user whose tunnel ends at the test server: no other MYMPS_* setting,
    and a MYMPS_HOME of its own so that no real ~/.mymps/token is read."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    return {**env, **QUIET_ENV, "MYMPS_SERVER_HOST": "127.0.0.1", "MYMPS_SERVER_PORT": str(server.port),
            "MYMPS_TOKEN": server.token, "MYMPS_HOME": str(home), **extra}


def mymps(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mymps_magic.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, out.stderr
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    return cli_env(server, tmp_path)


@pytest.fixture(scope="module")
def llama(server: ServerProcess, tiny_models: TinyModels) -> Iterator[str]:
    with Client(host="127.0.0.1", port=server.port, token=server.token) as c:
        c.load_model(LLAMA, path=str(tiny_models.text_llama), progress=False)
        yield LLAMA
        c.unload_model(LLAMA)


def model_jobs(server: ServerProcess, model: str) -> list[dict[str, object]]:
    with Client(host="127.0.0.1", port=server.port, token=server.token) as c:
        return [job for job in c.jobs() if job.get("model") == model]


# What a user reads.


def test_status_names_server_device_memory_counts_and_latency(server: ServerProcess, env: dict[str, str]) -> None:
    with Client(host="127.0.0.1", port=server.port, token=server.token) as c:
        health = c.health()
    out = mymps(env, "status")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"mymps {health['version']}" in text
    assert health["device"] in text and health["device_name"] in text
    memory = next(line for line in text.splitlines() if line.startswith("memory"))
    assert len(SIZE.findall(memory)) >= 2, memory  # used and total, each with its unit
    assert re.search(r"^models\s+\d+ loaded", text, re.M), text
    assert re.search(r"^jobs\s+\d+ running, \d+ queued", text, re.M), text
    assert re.search(r"^latency\s+\d+(\.\d+)? ms", text, re.M), text
    assert "{" not in text


def test_models_lists_one_aligned_line_per_model(env: dict[str, str], llama: str) -> None:
    out = mymps(env, "models")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "KIND", "DTYPE"]
    (row,) = [line for line in rows if line.startswith(llama + " ")]
    assert row.split()[1] == "text" and SIZE.search(row) and ("ago" in row or "just now" in row), row
    # Aligned: every column starts where its header does.
    assert row.index(" text ") + 1 == header.index("KIND")
    assert "{" not in out.stdout


def test_load_shows_progress_then_unload_frees_it(env: dict[str, str], tiny_models: TinyModels) -> None:
    name = str(tiny_models.text_gpt2)
    out = mymps(env, "load", name, "--kind", "text", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert "100%" in out.stderr, out.stderr  # the bar, finished
    assert out.stdout.strip().splitlines()[-1].startswith(f"Loaded {name} (text, float32) on ")
    assert any(line.startswith(name + " ") for line in mymps(env, "models").stdout.splitlines())

    out = mymps(env, "unload", name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Unloaded {name}, freed ") and SIZE.search(out.stdout), out.stdout
    assert not any(line.startswith(name + " ") for line in mymps(env, "models").stdout.splitlines())


def test_generate_streams_the_text_and_says_how_it_ended(env: dict[str, str], llama: str) -> None:
    out = mymps(env, "generate", llama, LONG_PROMPT, "--max-new-tokens", "6", "--temperature", "0", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the generated text is on stdout"
    assert re.fullmatch(r"6 tokens in \S+ s, \S+ tokens/s, stopped: max_tokens\n", out.stderr), out.stderr


def test_no_jobs_says_so(env: dict[str, str]) -> None:
    out = mymps(env, "jobs")
    assert out.returncode == 0 and out.stdout == "No jobs running or queued.\n", out.stdout + out.stderr


# Errors: one line on stderr, exit status 1.


def test_an_unknown_model_is_one_line(env: dict[str, str]) -> None:
    assert_one_line_error(mymps(env, "unload", "no-such-model"), "mymps unload:", "no-such-model")
    assert_one_line_error(mymps(env, "generate", "no-such-model", "hi"), "mymps generate:", "no-such-model")


def test_a_bad_dtype_is_one_line_naming_the_good_ones(env: dict[str, str]) -> None:
    assert_one_line_error(mymps(env, "load", "some-model", "--dtype", "float8"), "mymps load:", "bfloat16")


def test_every_command_has_its_verb() -> None:
    assert set(SERVER_VERBS) == set(VERBS)


def test_an_unknown_job_is_one_line(env: dict[str, str]) -> None:
    assert_one_line_error(mymps(env, "cancel", "job-that-never-was"), "mymps cancel:")


def test_a_bad_token_is_one_line(server: ServerProcess, tmp_path: Path) -> None:
    line = assert_one_line_error(mymps(cli_env(server, tmp_path, MYMPS_TOKEN="wrong"), "models"), "mymps models:")
    assert "token" in line.lower()


def test_an_unreachable_server_says_how_to_start_it(server: ServerProcess, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mymps(cli_env(server, tmp_path, MYMPS_SERVER_PORT=str(port)), "status")
    assert_one_line_error(out, "mymps status:", f"127.0.0.1:{port}", "mymps tunnel", "mymps serve")


def test_the_token_file_flag_is_read(server: ServerProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(server.token)
    env = cli_env(server, tmp_path, MYMPS_TOKEN="wrong")
    out = mymps(env, "models", "--token-file", str(token_file), "--port", str(server.port))
    assert out.returncode == 0, out.stderr


def test_ctrl_c_while_waiting_for_the_server_is_one_line(server: ServerProcess, tmp_path: Path) -> None:
    # A server that takes the connection and never answers: the command waits until Ctrl-C.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        env = cli_env(server, tmp_path, MYMPS_SERVER_PORT=str(silent.getsockname()[1]))
        process = subprocess.Popen([sys.executable, "-m", "mymps_magic.cli", "models"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
        connection, _ = silent.accept()
        with connection:
            connection.recv(4096)  # the request is sent: the command waits for the answer
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "mymps models: interrupted.\n"


# A running generation: seen in `jobs`, cancelled by `cancel` or by Ctrl-C.


def start_generation(env: dict[str, str], model: str) -> tuple[subprocess.Popen[bytes], bytes]:
    """`mymps generate` on a long generation, and the first text it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mymps_magic.cli", "generate", model, LONG_PROMPT, "--max-new-tokens", "8192",
         "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            first = os.read(process.stdout.fileno(), 4096)
            assert first, process.stderr.read() if process.stderr else ""
            return process, first
        assert process.poll() is None, process.communicate()
    process.kill()
    pytest.fail("no text from mymps generate within 60 s")


@pytest.mark.slow
def test_ctrl_c_cancels_the_generation_on_the_server(server: ServerProcess, env: dict[str, str],
                                                      llama: str) -> None:
    process, first = start_generation(env, llama)
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert (first + rest).strip(), "the text so far stays on the terminal"
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"mymps generate: cancelled after \d+ tokens\.", lines[0]), err
    assert model_jobs(server, llama) == [], "the job is gone from /jobs by the time the command exits"


@pytest.mark.slow
def test_jobs_lists_a_running_generation_and_cancel_stops_it(server: ServerProcess, env: dict[str, str],
                                                             llama: str) -> None:
    process, _ = start_generation(env, llama)
    try:
        out = mymps(env, "jobs")
        assert out.returncode == 0, out.stderr
        header, *rows = out.stdout.splitlines()
        assert header.split() == ["ID", "KIND", "STATE", "MODEL", "SESSION", "PROGRESS", "AGE"]
        (row,) = [line for line in rows if f" {llama} " in line]
        assert row.split()[1:3] == ["generate", "running"], row
        job_id = row.split()[0]

        out = mymps(env, "cancel", job_id)
        assert out.returncode == 0 and out.stdout == f"Cancelled job {job_id}.\n", out.stdout + out.stderr
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert err.decode().strip() == "mymps generate: the job was cancelled on the server.", err


# `mymps dashboard` hands its arguments to the dashboard package.


def run_main(setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys\n{setup}\nfrom mymps_magic.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_dashboard_gets_every_argument_after_the_verb() -> None:
    # A stand-in package: what is tested is the hand-over, not the dashboard.
    setup = ("import types\nmodule = types.ModuleType('mymps_magic.dashboard')\n"
             "module.main = lambda argv=None: print('dashboard', argv) or 3\n"
             "sys.modules['mymps_magic.dashboard'] = module")
    out = run_main(setup, "dashboard", "--port", "9000", "--help")
    assert out.returncode == 3, out.stderr
    assert out.stdout == "dashboard ['--port', '9000', '--help']\n"


def test_dashboard_help_is_the_dashboards_own() -> None:
    out = run_main("", "dashboard", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: mymps dashboard") and "--port" in out.stdout, out.stdout


def test_dashboard_without_its_extra_says_what_to_install() -> None:
    setup = ("class Missing:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'mymps_magic.dashboard':\n"
             "            raise ModuleNotFoundError(\"No module named 'flask'\", name='flask')\n"
             "sys.meta_path.insert(0, Missing())")
    out = run_main(setup, "dashboard")
    assert out.returncode == 1, out.stderr
    assert out.stderr == ("mymps dashboard: flask is missing. "
                          "Install the dashboard extra: pip install 'mymps[dashboard]'\n")


# The cells' pieces: the formats the commands print.


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (5 * 2**20, "5.0 MiB"), (int(15.6 * 2**30), "15.6 GiB")])
def test_sizes_read_in_binary_units(n: int, text: str) -> None:
    assert size(n) == text


@pytest.mark.parametrize(("age", "text"), [(-3, "just now"), (42, "42 s ago"), (150, "2 min ago"),
                                           (2 * 3600 + 5, "2 h ago"), (3 * 86400, "3 d ago")])
def test_times_read_as_ages(age: float, text: str) -> None:
    assert ago(1000.0 - age, now=1000.0) == text


def test_table_aligns_columns_under_their_headers() -> None:
    assert table([["A", "BB"], ["long", "x"], ["s", "yy"]]) == ["A     BB", "long  x", "s     yy"]
