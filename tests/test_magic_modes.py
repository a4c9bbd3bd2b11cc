"""The magics match the Client, non-blocking cells and the every-cell-remote mode (issue 12, items 5
and 7), in a real Jupyter kernel against the real server.

A non-blocking cell is held on the server by a gate (a file the test creates), so what the test
checks while the cell runs cannot race it: the cell waits for the test, never for a clock.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from notebook_kernel import CellRun, Kernel, ok
from kit import ServerProcess

from mymps_magic import Client, RemoteError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOOP_PROMPT = "Machine learning"  # greedy decoding of it on the tiny Llama runs to max_new_tokens


def plain(text: str) -> str:
    return ANSI.sub("", text)


def error_lines(run: CellRun) -> list[str]:
    assert run.status == "error", f"the cell should have failed: {run.stdout!r} {run.stderr!r}"
    assert run.error is not None, "an error message on iopub"
    return [plain(line) for chunk in run.error["traceback"] for line in chunk.splitlines()]


def gated(gate: Path, body: str) -> str:
    """Remote code that waits (up to a minute) for ``gate`` to exist, then runs ``body``."""
    return ("import os, time\n"
            f"_deadline = time.monotonic() + 60\n"
            f"while not os.path.exists({str(gate)!r}) and time.monotonic() < _deadline:\n"
            "    time.sleep(0.02)\n" + body)


def markers(run: CellRun) -> list[str]:
    return [m["content"]["data"]["text/plain"] for m in run.of_type("display_data")
            if "mymps" in m["content"]["data"].get("text/plain", "")]


# -- item 7: the magics take what the Client takes ---------------------------------------------------


def test_generate_takes_stop_strings_and_a_seed(nb: Kernel, llama: str) -> None:
    base = f"%mymps generate {llama} '{LOOP_PROMPT}' --max-new-tokens 60 --no-stream"
    full = ok(nb.execute(f"{base} --temperature 0")).stdout.rpartition("\n[")[0]
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 3)
                if full.find(full[i:i + 3]) >= 3 and full[i:i + 3].strip())
    cut = ok(nb.execute(f"{base} --temperature 0 --stop 'never here' --stop {shlex.quote(stop)}")).stdout
    text, _, stats = cut.rstrip("\n").rpartition("\n")
    assert stats.endswith("stopped by stop]"), cut
    assert stop not in text and full.startswith(text), (stop, text, full)

    sampled = [ok(nb.execute(f"{base} --temperature 1.5 --seed 7")).stdout.rpartition("\n[")[0] for _ in range(2)]
    assert sampled[0] == sampled[1], "--seed repeats a sampled generation"


def test_generate_takes_top_k_and_a_repetition_penalty(nb: Kernel, llama: str) -> None:
    base = f"%mymps generate {llama} '{LOOP_PROMPT}' --max-new-tokens 30 --no-stream"
    greedy = ok(nb.execute(f"{base} --temperature 0")).stdout.rpartition("\n[")[0]

    assert ok(nb.execute(f"{base} --temperature 2 --top-k 1 --seed 3")).stdout.rpartition("\n[")[0] == greedy
    penalised = ok(nb.execute(f"{base} --temperature 0 --repetition-penalty 1.8")).stdout.rpartition("\n[")[0]
    assert penalised and penalised != greedy, "the greedy loop is broken by the penalty"


@pytest.mark.parametrize("flag, option", [("--width 16", "width"), ("--height 16", "height"),
                                          ("--guidance-scale 2.5", "guidance_scale")])
def test_image_passes_size_and_guidance_to_the_pipeline(nb: Kernel, diffusion: str, flag: str, option: str) -> None:
    """The tiny DDPM pipeline takes none of them, and the server names the one it was given."""
    lines = error_lines(nb.execute(f"%mymps image {diffusion} 'a fox' --steps 2 {flag}"))
    assert len(lines) == 1 and lines[0].startswith("BadRequestError: "), lines
    assert f"does not take {option}" in lines[0], lines


def test_image_num_images_is_still_taken(nb: Kernel, diffusion: str) -> None:
    run = ok(nb.execute(f"%mymps image {diffusion} 'a fox' --steps 2 --num-images 2"))
    assert len(run.of_type("display_data")) == 2


@pytest.mark.parametrize("spelling", ["sp_a,sp_b", "sp_a sp_b", "sp_a, sp_b", "sp_a,sp_b sp_c"])
def test_push_spellings_are_the_same_for_the_line_and_the_cell(nb: Kernel, spelling: str) -> None:
    names = re.split(r"[,\s]+", spelling)
    ok(nb.execute("sp_a, sp_b, sp_c = 'A', 'B', 'C'"))
    ok(nb.execute("%%mymps\nfor _n in ('sp_a', 'sp_b', 'sp_c'):\n    globals().pop(_n, None)"))
    assert ok(nb.execute(f"%mymps push {spelling}")).stdout == f"Pushed {', '.join(names)}.\n"
    shown = ok(nb.execute("%%mymps\n[_n for _n in ('sp_a', 'sp_b', 'sp_c') if _n in globals()]")).result
    assert shown == {"text/plain": repr(names)}

    ok(nb.execute("%%mymps\nfor _n in ('sp_a', 'sp_b', 'sp_c'):\n    globals().pop(_n, None)"))
    cell = ok(nb.execute(f"%%mymps --push {spelling} --timeout 60\n"
                         "[_n for _n in ('sp_a', 'sp_b', 'sp_c') if _n in globals()]")).result
    assert cell == {"text/plain": repr(names)}


@pytest.mark.parametrize("code, options", [
    ("%mymps generate --help", ["--stop", "--seed", "--max-new-tokens", "--no-stream", "--top-k",
                                "--repetition-penalty"]),
    ("%mymps image -h", ["--width", "--height", "--guidance-scale", "--num-images", "--steps"]),
    ("%mymps push --help", ["VAR"]),
    ("%%mymps --help\n1", ["--push", "--pull", "--timeout", "--noblock"]),
])
def test_subcommand_help_prints_its_options(nb: Kernel, code: str, options: list[str]) -> None:
    run = ok(nb.execute(code))
    assert run.result is None, "help runs nothing"
    for option in options:
        assert option in run.stdout, f"{code!r} does not list {option}:\n{run.stdout}"


def test_interrupt_with_nothing_running_says_so(nb: Kernel) -> None:
    run = ok(nb.execute("%mymps interrupt"))
    assert run.stdout == "Nothing of this session is running: nothing to interrupt.\n"


# -- item 5: non-blocking cells ----------------------------------------------------------------------


def test_noblock_returns_a_handle_and_wait_shows_its_output_and_value(nb: Kernel, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run = ok(nb.execute("%%mymps --noblock\n" + gated(gate, "print('nb-out')\nnb_value = 6 * 7\nnb_value")))
    assert run.stdout == "" and run.result is not None, (run.stdout, run.result)
    assert re.fullmatch(r"<remote cell \d+: running>", run.result["text/plain"]), run.result
    assert ok(nb.execute("nb_h = _\nprint(type(nb_h).__name__, nb_h.done())")).stdout == "CellFuture False\n"

    gate.touch()
    other = ok(nb.execute("%%mymps\n'other cell'"))  # queued behind the gated cell in the session
    assert "nb-out" not in other.stdout, "a non-blocking cell's output is kept for the cell that waits"
    assert other.result == {"text/plain": "'other cell'"}

    waited = ok(nb.execute("%mymps wait"))
    assert waited.stdout == "nb-out\n"
    assert waited.result == {"text/plain": "42"}
    again = ok(nb.execute("%mymps wait nb_h"))
    assert again.stdout == "nb-out\n" and again.result == {"text/plain": "42"}, "the handle keeps its output"
    assert re.fullmatch(r"<remote cell \d+: done>", ok(nb.execute("nb_h")).result["text/plain"])


def test_wait_shows_a_failed_cell_s_output_then_its_remote_error(nb: Kernel, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    ok(nb.execute("%%mymps --noblock\nprint('before', flush=True)\n" + gated(gate, "print('after')\n1 / 0")))
    ok(nb.execute("nb_failed = _"))
    gate.touch()
    run = nb.execute("%mymps wait")
    text = "\n".join(error_lines(run))
    assert run.stdout == "before\nafter\n"
    assert "ZeroDivisionError" in text and "1 / 0" in text, text
    assert "mymps_magic" not in text, f"a remote traceback, not the client's frames:\n{text}"
    shown = ok(nb.execute("print(repr(nb_failed))")).stdout
    assert re.fullmatch(r"<remote cell \d+: failed \(ZeroDivisionError\)>\n", shown), shown


@pytest.mark.slow
def test_wait_without_a_handle_or_with_a_wrong_one_is_a_usage_error(own_kernel: Callable[..., Kernel],
                                                                     server: ServerProcess) -> None:
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    for code, says in [("%mymps wait", "no --noblock cell"), ("x = 3\n%mymps wait x", "not a --noblock cell"),
                       ("%%mymps --noblock --pull y\ny = 1", "--pull")]:
        run = kernel.execute(code)
        assert run.reply["content"]["ename"] == "UsageError", run.reply["content"]
        assert says in run.stderr, run.stderr


def test_submit_cell_keeps_its_output_for_display_outputs(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    future = client.submit_cell("print('kept', flush=True)\nimport sys\nprint('err', file=sys.stderr)\n2 + 3")
    value = future.result(timeout=60)
    assert value is not None and value.mime == {"text/plain": "5"}
    assert capsys.readouterr() == ("", ""), "nothing shows until asked"
    assert future.outputs == [("stdout", "kept\n"), ("stderr", "err\n")]
    future.display_outputs()
    assert capsys.readouterr() == ("kept\n", "err\n")

    failed = client.submit_cell("undefined_name_in_submit_cell")
    with pytest.raises(RemoteError, match="undefined_name_in_submit_cell"):
        failed.result(timeout=60)
    assert re.fullmatch(r"<remote cell \d+: failed \(NameError\)>", repr(failed)), repr(failed)


# -- item 5: every cell remote -----------------------------------------------------------------------


@pytest.mark.slow
def test_on_runs_every_cell_remotely_until_off(own_kernel: Callable[..., Kernel], server: ServerProcess) -> None:
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    ok(kernel.execute("import os\nlocal_pid = os.getpid()"))
    assert "run remotely" in ok(kernel.execute("%mymps on")).stdout

    run = ok(kernel.execute("import os\nmode_pid = os.getpid()\nprint('remote print')\nmode_pid"))
    assert run.stdout == "remote print\n"
    assert len(markers(run)) == 1, run.of_type("display_data")
    remote_pid = int(run.result["text/plain"])

    failed = kernel.execute("1 / 0")
    assert failed.status == "error" and failed.error is not None
    assert "ZeroDivisionError" in failed.error["ename"] + "".join(failed.error["traceback"])
    assert len(markers(failed)) == 1

    still = ok(kernel.execute("mode_pid"))
    assert still.result == {"text/plain": str(remote_pid)}, "the mode survives an error"

    off = ok(kernel.execute("%mymps off"))
    assert markers(off) == [] and "locally" in off.stdout
    local = ok(kernel.execute("print(os.getpid() == local_pid, 'mode_pid' in globals())"))
    assert local.stdout == "True False\n" and markers(local) == []
    assert remote_pid != ok(kernel.execute("local_pid")).result


@pytest.mark.slow
def test_line_magics_run_locally_in_remote_mode(own_kernel: Callable[..., Kernel], server: ServerProcess,
                                                tmp_path: Path) -> None:
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    ok(kernel.execute("lm_local = 'here'\n%mymps on"))
    assert ok(kernel.execute("%mymps push lm_local")).stdout == "Pushed lm_local.\n"
    assert ok(kernel.execute("lm_local * 2")).result == {"text/plain": "'herehere'"}
    ok(kernel.execute("%%mymps --noblock\n" + gated(tmp_path / "gate", "'late'")))
    (tmp_path / "gate").touch()
    assert ok(kernel.execute("%mymps wait")).result == {"text/plain": "'late'"}
    ok(kernel.execute("%mymps off"))


def test_submit_cell_keeps_only_its_own_output(client: Client, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A call submitted earlier prints while the cell waits behind it: that output is the call's,
    shown as it comes, never kept in the cell's handle."""
    gate = tmp_path / "gate"
    call = client.submit(exec, gated(gate, "print('from the call', flush=True)"))
    cell = client.submit_cell("print('from the cell')\n'cell value'")
    gate.touch()
    call.result(timeout=60)
    assert cell.result(timeout=60) is not None
    assert cell.outputs == [("stdout", "from the cell\n")]
    assert "from the call" in capsys.readouterr().out
