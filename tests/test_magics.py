"""``%mymps`` and ``%%mymps`` in a real Jupyter kernel (SPEC 6), against the real server.

One kernel serves the module: it loads the extension once and talks to the session's shared
``server`` through ``MYMPS_SERVER_PORT`` / ``MYMPS_TOKEN``, so every subcommand connects with the
defaults. The models it needs are loaded under names of its own (``magics-...``) and unloaded
when the module ends. Tests that replace the notebook's client start a kernel of their own.

What a test sees is what a notebook front end receives: the iopub messages of each cell with
the time each arrived, and the execute reply (`kernels.CellRun`).
"""

from __future__ import annotations

import base64
import io
import re
import shlex
import time
from typing import Any, Callable

import pytest
from PIL import Image

from notebook_kernel import CellRun, Kernel, ok
from kit import MakeServer, ServerProcess, TinyModels

GPT2 = "magics-gpt2-unload"
SUBCOMMANDS = ["connect", "status", "health", "models", "stats", "jobs", "load", "unload", "generate", "chat",
               "image", "push", "pull", "reset", "interrupt", "wait", "on", "off"]
JOB_COLUMNS = ["id", "kind", "state", "model", "session", "progress", "since"]
# Greedy decoding of this prompt on the tiny Llama loops without EOS (see test_api.py).
LOOP_PROMPT = "Machine learning"
# Words that only appear in a traceback of the client's own frames.
CLIENT_FRAMES = ("mymps_magic", "_session.py", "magics.py", "client.py", "site-packages", "kernel_server")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- helpers -----------------------------------------------------------------------------------------


def status_text(run: CellRun) -> str:
    """The plain-text form of the panel ``%mymps status`` showed."""
    return str(run.of_type("display_data")[-1]["content"]["data"]["text/plain"])


def plain(text: str) -> str:
    return ANSI.sub("", text)


def traceback_text(run: CellRun) -> str:
    assert run.status == "error", f"the cell should have failed: {run.stdout!r} {run.stderr!r}"
    assert run.error is not None, "an error message on iopub"
    return plain("\n".join(run.error["traceback"]))


def assert_no_client_frames(text: str) -> None:
    for word in CLIENT_FRAMES:
        assert word not in text, f"client-side frames ({word}) in what the user sees:\n{text}"


def usage_error(run: CellRun) -> str:
    """The one ``UsageError:`` line IPython prints for bad magic input (no traceback)."""
    assert run.status == "error"
    assert run.reply["content"]["ename"] == "UsageError", run.reply["content"]
    assert run.error is None, f"a UsageError prints its line, not a traceback: {run.error}"
    lines = plain(run.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), run.stderr
    return lines[0]


def stream_times(run: CellRun, name: str = "stdout") -> list[tuple[float, str]]:
    return [(t, m["content"]["text"]) for t, m in run.messages
            if m["header"]["msg_type"] == "stream" and m["content"]["name"] == name]


def png(data: dict[str, Any]) -> Image.Image:
    assert "image/png" in data, sorted(data)
    raw = base64.b64decode(data["image/png"])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def progress_updates(run: CellRun, total: int) -> list[tuple[float, float]]:
    """(time, count) for each update of a progress bar of ``total``, however tqdm.auto drew it:
    as an ipywidgets bar (comm messages) where ipywidgets is installed, else as text on stderr."""
    opened = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in run.of_type("comm_open")}
    bars = {cid for cid, state in opened.items()
            if state.get("_model_name") == "FloatProgressModel" and state.get("max") == total}
    if bars:
        return [(t, float(m["content"]["data"]["state"]["value"])) for t, m in run.messages
                if m["header"]["msg_type"] == "comm_msg" and m["content"]["comm_id"] in bars
                and "value" in m["content"]["data"].get("state", {})]
    return [(t, float(n)) for t, text in stream_times(run, "stderr")
            for n in re.findall(rf"(\d+)/{total}\b", text)]


# -- the extension and its help ----------------------------------------------------------------------


def test_load_ext_registers_the_line_and_the_cell_magic(nb: Kernel) -> None:
    run = ok(nb.execute("_m = get_ipython().magics_manager.magics\n"
                        "print('mymps' in _m['line'], 'mymps' in _m['cell'])"))
    assert run.stdout == "True True\n"


def test_help_explains_every_subcommand_with_an_example(nb: Kernel) -> None:
    for line in ("%mymps help", "%mymps"):
        text = ok(nb.execute(line)).stdout
        commands, _, examples = text.partition("Examples:")
        assert examples, f"{line!r} has no examples:\n{text}"
        example_lines = [ln.strip() for ln in examples.splitlines() if ln.strip().startswith("%mymps ")]
        for sub in SUBCOMMANDS:
            assert re.search(rf"^\s+{sub}\b", commands, re.M), f"{sub} is not listed by {line!r}"
            assert any(re.search(rf"\b{sub}\b", ex) for ex in example_lines), f"no example of {sub}"
        assert re.search(r"%%mymps --push \S+ --pull \S+ --timeout \d+", examples), "no %%mymps example"
        assert "MYMPS_TOKEN" in text and "--token-file" in text, "the help says how to give the token"


def test_question_mark_help_goes_to_the_pager(nb: Kernel) -> None:
    for code in ("%mymps?", "%%mymps?"):
        run = ok(nb.execute(code))
        pages = [p for p in run.reply["content"]["payload"] if p.get("source") == "page"]
        assert pages, f"{code} sent nothing to the pager: {run.reply['content']}"
        text = plain(pages[0]["data"]["text/plain"])
        assert "Examples:" in text
        for sub in SUBCOMMANDS:
            assert re.search(rf"\b{sub}\b", text), f"{code} does not mention {sub}"


@pytest.mark.parametrize("code, says", [
    ("%mymps bogus", "invalid choice: 'bogus'"),
    ("%mymps load --nope x", "unrecognized arguments: --nope"),
    ("%mymps generate", "required"),
    ("%mymps image m p --steps many", "invalid int value: 'many'"),
    ("%mymps generate m 'unbalanced", "No closing quotation"),
    ("%mymps connect nonsense", "HOST:PORT"),
    ("%mymps push never_defined_locally_1", "never_defined_locally_1"),
    ("%%mymps --wat\n1", "unrecognized arguments: --wat"),
    ("%%mymps --timeout soon\n1", "invalid float value: 'soon'"),
    ("%%mymps --push 1x\n1", "1x"),
    ("%%mymps --push never_defined_locally_2\n1", "never_defined_locally_2"),
])
def test_bad_input_is_one_usage_error_line(nb: Kernel, code: str, says: str) -> None:
    line = usage_error(nb.execute(code))
    assert says in line


# -- %%mymps -----------------------------------------------------------------------------------------


def test_cell_output_streams_while_the_remote_code_runs(nb: Kernel) -> None:
    run = ok(nb.execute(
        "%%mymps\nimport sys, time\n"
        "print('first', flush=True)\nprint('warned', file=sys.stderr, flush=True)\n"
        "time.sleep(1.5)\nprint('second')\n6 * 7"
    ))
    assert run.stdout == "first\nsecond\n"
    assert run.stderr == "warned\n"
    assert run.result == {"text/plain": "42"}
    first_at = stream_times(run)[0][0]
    warned_at = stream_times(run, "stderr")[0][0]
    assert run.reply_at - first_at > 0.8, "stdout must arrive while the remote code still runs"
    assert run.reply_at - warned_at > 0.8, "stderr must arrive while the remote code still runs"
    kinds = [m["header"]["msg_type"] for _, m in run.messages]
    assert kinds.index("execute_result") > max(i for i, k in enumerate(kinds) if k == "stream")


def test_last_expression_shows_with_its_rich_repr(nb: Kernel) -> None:
    html = ok(nb.execute(
        "%%mymps\nclass Card:\n"
        "    def _repr_html_(self): return '<b>rich card</b>'\n"
        "    def __repr__(self): return 'Card()'\n"
        "Card()"
    )).result
    assert html == {"text/html": "<b>rich card</b>", "text/plain": "Card()"}

    image = ok(nb.execute("%%mymps\nfrom PIL import Image\nImage.new('RGB', (3, 2), 'blue')")).result
    assert image is not None
    assert png(image).size == (3, 2)

    # A value that cannot be pickled back still shows through the repr the server made of it.
    lock = ok(nb.execute("%%mymps\nimport threading\nthreading.Lock()")).result
    assert lock is not None and lock["text/plain"].startswith("<unlocked _thread.lock object")

    assert ok(nb.execute("%%mymps\nrich_unused = 1")).result is None, "a statement shows nothing"
    assert ok(nb.execute("%%mymps\nNone")).result is None


def test_trailing_semicolon_hides_the_value_as_in_ipython(nb: Kernel) -> None:
    """``plt.plot(...);`` in a notebook shows no value: a remote cell keeps that convention."""
    assert ok(nb.execute("6 * 7;")).result is None, "IPython's own convention, for reference"
    run = ok(nb.execute("%%mymps\nsemi = 6 * 7\nsemi;"))
    assert run.result is None, f"the value of a line ending in ';' is shown: {run.result}"
    assert ok(nb.execute("%%mymps\nsemi")).result == {"text/plain": "42"}, "the cell did run"


def test_remote_display_reaches_the_notebook_in_order(nb: Kernel) -> None:
    run = ok(nb.execute(
        "%%mymps\nfrom PIL import Image\n"
        "class Note:\n    def _repr_html_(self): return '<i>remote note</i>'\n"
        "print('before', flush=True)\n"
        "display(Image.new('RGB', (5, 3), (255, 0, 0)))\n"
        "display(Note())\n"
        "print('after')\n"
    ))
    shown = [(m["header"]["msg_type"], m["content"]) for _, m in run.messages
             if m["header"]["msg_type"] in ("stream", "display_data")]
    assert [kind for kind, _ in shown] == ["stream", "display_data", "display_data", "stream"], shown
    image = png(shown[1][1]["data"])
    assert image.size == (5, 3) and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert shown[2][1]["data"]["text/html"] == "<i>remote note</i>"
    assert run.result is None


def test_remote_matplotlib_figure_displays_as_png(nb: Kernel) -> None:
    run = ok(nb.execute(
        "%%mymps\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 3), dpi=50)\nax.plot([1, 3, 2])\n"
        "display(fig)\nplt.close(fig)\n"
    ))
    displays = run.of_type("display_data")
    assert len(displays) == 1, [m["content"]["data"].keys() for m in displays]
    width, height = png(displays[0]["content"]["data"]).size
    # 4 x 3 inches at 50 dpi, less the margins IPython's tight bounding box trims.
    assert 150 <= width <= 200 and 100 <= height <= 150, (width, height)


def test_remote_progress_bar_shows_and_updates_live(nb: Kernel) -> None:
    run = ok(nb.execute("%%mymps\nimport time\nfor i in progress(range(5)):\n    time.sleep(0.3)"))
    updates = progress_updates(run, 5)
    counts = [n for _, n in updates]
    assert len(set(counts)) >= 4, f"the bar should update several times: {counts}"
    assert counts == sorted(counts) and counts[-1] == 5, counts
    first_step = next(t for t, n in updates if n >= 1)
    assert run.reply_at - first_step > 0.5, "the bar must move while the remote loop runs"


def test_cell_push_and_pull_move_variables_both_ways(nb: Kernel) -> None:
    ok(nb.execute("cp_a = [1, 2]\ncp_b = {'k': 3}"))
    ok(nb.execute("%%mymps --push cp_a,cp_b --pull cp_c,cp_d\ncp_c = sum(cp_a) + cp_b['k']\ncp_d = [2 * v for v in cp_a]"))
    assert ok(nb.execute("print(cp_c, cp_d)")).stdout == "6 [2, 4]\n"
    assert ok(nb.execute("%%mymps\ncp_a, cp_b")).result == {"text/plain": "([1, 2], {'k': 3})"}
    # One name pulls the value itself, not a one-element tuple.
    ok(nb.execute("%%mymps --pull cp_c\ncp_c = 'single'"))
    assert ok(nb.execute("print(repr(cp_c))")).stdout == "'single'\n"


def test_timeout_interrupts_the_remote_code(nb: Kernel) -> None:
    start = time.monotonic()
    run = nb.execute("%%mymps --timeout 1\nimport time\ntime.sleep(30)", timeout=20)
    assert run.reply_at - start < 5, "the cell should end about a second in"
    text = traceback_text(run)
    assert "KeyboardInterrupt" in text and "time.sleep(30)" in text
    assert_no_client_frames(text)
    assert ok(nb.execute("%%mymps\n'alive'")).result == {"text/plain": "'alive'"}


def test_stop_button_raises_keyboard_interrupt_remotely(nb: Kernel) -> None:
    ok(nb.execute("%%mymps\nstop_before = 'kept'"))
    start = time.monotonic()
    run = nb.execute("%%mymps\nimport time\nstop_during = 'set'\ntime.sleep(30)", timeout=20, interrupt_after=1.0)
    assert run.reply_at - start < 5, "the stop button should end the cell within a few seconds"
    text = traceback_text(run)
    assert "KeyboardInterrupt" in text
    assert "line 3" in text and "time.sleep(30)" in text, "the remote cell line is shown"
    assert_no_client_frames(text)
    assert len(text.splitlines()) <= 6, f"a short remote traceback:\n{text}"

    after = ok(nb.execute("%%mymps\nstop_before, stop_during"))
    assert after.result == {"text/plain": "('kept', 'set')"}, "the same remote namespace, still usable"


def test_stop_button_is_a_real_remote_keyboard_interrupt(nb: Kernel) -> None:
    run = ok(nb.execute(
        "%%mymps\nimport time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('caught remotely')\n'finished'",
        timeout=20, interrupt_after=1.0,
    ))
    assert run.stdout == "caught remotely\n"
    assert run.result == {"text/plain": "'finished'"}


# -- %mymps subcommands ------------------------------------------------------------------------------


def test_load_shows_a_progress_bar_and_a_loaded_line(nb: Kernel, llama_load: CellRun, llama: str) -> None:
    bar_texts = [m["content"]["data"].get("text/plain", "") for m in llama_load.of_type("display_data")]
    assert any(text.startswith(f"Loading {llama}") for text in bar_texts) or f"Loading {llama}" in llama_load.stderr, \
        (bar_texts, llama_load.stderr)
    assert re.fullmatch(rf"Loaded {llama} on cpu \(float32\) in \d+\.\d s\.\n", llama_load.stdout), llama_load.stdout
    again = ok(nb.execute(f"%mymps load {llama}"))
    assert again.stdout == f"{llama} was already loaded.\n"


def test_generate_streams_tokens_into_the_cell(nb: Kernel, llama: str) -> None:
    start = time.monotonic()
    run = ok(nb.execute(f"%mymps generate {llama} '{LOOP_PROMPT}' --temperature 0 --max-new-tokens 120"))
    pieces = stream_times(run)
    assert len(pieces) > 20, f"tokens should arrive as they come, not at once: {len(pieces)} stream messages"
    assert pieces[0][0] - start < 0.5 * (run.reply_at - start), "the first tokens arrive early"
    streamed, stats = split_stats(run)

    once = ok(nb.execute(f"%mymps generate {llama} '{LOOP_PROMPT}' --temperature 0 --max-new-tokens 120 --no-stream"))
    text, _ = split_stats(once)
    assert stream_times(once)[0][1].startswith(text), "--no-stream prints the text once, then the stats line"
    assert text == streamed, "the same greedy text either way"
    assert len(streamed.strip()) > 50


def split_stats(run: CellRun) -> tuple[str, str]:
    """A generate cell's text and its stats line, which goes to stdout: a notebook shows stderr
    as an error box, and a normal generation is no error."""
    assert run.stderr == "", f"nothing on stderr for a normal generation: {run.stderr!r}"
    text, _, stats = run.stdout.rstrip("\n").rpartition("\n")
    assert re.fullmatch(r"\[120 tokens, [\d.]+ tokens/s, stopped by max_tokens\]", stats), run.stdout[-200:]
    return text + "\n", stats


def test_image_displays_the_images(nb: Kernel, diffusion: str) -> None:
    run = ok(nb.execute(f"%mymps image {diffusion} 'a red fox' --steps 2 --seed 1 --num-images 2"))
    images = [png(m["content"]["data"]) for m in run.of_type("display_data")]
    assert [image.size for image in images] == [(8, 8), (8, 8)]
    again = ok(nb.execute(f"%mymps image {diffusion} 'a red fox' --steps 2 --seed 1 --num-images 2"))
    first = run.of_type("display_data")[0]["content"]["data"]["image/png"]
    assert again.of_type("display_data")[0]["content"]["data"]["image/png"] == first, "--seed repeats an image"


def test_health_models_stats_jobs_and_status_print_tables(nb: Kernel, server: ServerProcess, llama: str) -> None:
    health = ok(nb.execute("%mymps health")).stdout.splitlines()
    assert re.match(r"ok  mymps \S+  python 3\.\d+\.\d+  torch \S+", health[0]), health
    assert health[1].startswith("device  cpu ")
    assert health[2].startswith("models  ") and llama in health[2]

    models = ok(nb.execute("%mymps models")).stdout.splitlines()
    assert models[0].split() == ["name", "kind", "dtype", "device", "params", "size", "used"]
    row = next(line.split() for line in models[1:] if line.startswith(llama + " "))
    assert row[1:4] == ["text", "float32", "cpu"]
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", row[4]) and row[6] in ("KiB", "MiB"), row

    stats = ok(nb.execute("%mymps stats")).stdout
    assert re.match(r"device  cpu \(.*\): [\d.]+ \w+ allocated, [\d.]+ \w+ in use of [\d.]+ \w+\n"
                    r"ram     [\d.]+ \w+ of [\d.]+ \w+   cpu \d+%\n"
                    r"jobs    \d+ running, \d+ queued\n$", stats), stats

    jobs = ok(nb.execute("%mymps jobs")).stdout
    # The shared server may be busy with another module's work; idle, it says so in words.
    assert jobs == "No jobs.\n" or jobs.split("\n")[0].split() == JOB_COLUMNS, jobs

    # The panel (tests/test_panel.py), whose plain-text form sums it up for front ends without widgets.
    status = status_text(ok(nb.execute("%mymps status")))
    assert re.match(rf"Server  127\.0\.0\.1:{server.port}  mymps \S+  \([\d.]+ ms round trip\)\n", status), status
    assert "\ndevice  cpu" in status and "\njobs    " in status
    assert re.search(rf"^models  .*{llama} \([\d.]+ \w+\)", status, re.M), status


def test_jobs_lists_running_work_and_interrupt_stops_it(nb: Kernel) -> None:
    ok(nb.execute(
        "import time\n"
        "jobs_client = get_ipython().magics_manager.registry['MympsMagics'].connected\n"
        "jobs_future = jobs_client.submit(time.sleep, 30)\n"
        "while not jobs_future.running(): time.sleep(0.02)\n"
    ))
    table = ok(nb.execute("%mymps jobs")).stdout.splitlines()
    assert table[0].split() == JOB_COLUMNS
    session = ok(nb.execute("print(jobs_client.session.session_id[:8])")).stdout.strip()
    assert any(line.split()[1:3] == ["run", "running"] and session in line for line in table[1:]), table

    ok(nb.execute("%mymps interrupt"))
    outcome = ok(nb.execute(
        "try:\n    jobs_future.result(timeout=5)\nexcept Exception as exc:\n"
        "    print(type(exc).__name__, exc.ename)\n"
    ))
    assert outcome.stdout == "KeyboardInterrupt KeyboardInterrupt\n"
    after = ok(nb.execute("%mymps jobs")).stdout
    assert not any(session in line and "running" in line for line in after.splitlines()), after


def test_line_push_and_pull(nb: Kernel) -> None:
    ok(nb.execute("lp_x = [1, 2, 3]"))
    assert ok(nb.execute("%mymps push lp_x")).stdout == "Pushed lp_x.\n"
    ok(nb.execute("%%mymps\nlp_y = [10 * v for v in lp_x]\nlp_z = 'zed'"))
    ok(nb.execute("del lp_x"))
    assert ok(nb.execute("%mymps pull lp_y")).stdout == "Pulled lp_y.\n"
    assert ok(nb.execute("print(lp_y)")).stdout == "[10, 20, 30]\n"
    assert ok(nb.execute("%mymps pull lp_x lp_z")).stdout == "Pulled lp_x, lp_z.\n"
    assert ok(nb.execute("print(lp_x, lp_z)")).stdout == "[1, 2, 3] zed\n"


def test_reset_empties_the_remote_namespace_and_keeps_models(nb: Kernel, llama: str) -> None:
    ok(nb.execute("%%mymps\nreset_me = 1"))
    assert ok(nb.execute("%mymps reset")).stdout == "The remote namespace is empty again (models stay loaded).\n"
    gone = traceback_text(nb.execute("%%mymps\nreset_me"))
    assert "NameError: name 'reset_me' is not defined" in gone
    kept = ok(nb.execute(f"%%mymps\n{llama!r} in list(models), DEVICE.type"))
    assert kept.result == {"text/plain": "(True, 'cpu')"}


def test_unload_frees_the_model(nb: Kernel, tiny_models: TinyModels) -> None:
    ok(nb.execute(f"%mymps load {GPT2} --path {shlex.quote(str(tiny_models.text_gpt2))}"))
    run = ok(nb.execute(f"%mymps unload {GPT2}"))
    assert re.fullmatch(rf"Unloaded {GPT2} \([\d.]+ (KiB|MiB) freed\)\.\n", run.stdout), run.stdout
    assert GPT2 not in ok(nb.execute("%mymps models")).stdout
    again = traceback_text(nb.execute(f"%mymps unload {GPT2}"))
    assert again.startswith("NotFoundError: ") and len(again.splitlines()) == 1 and GPT2 in again


@pytest.mark.slow
def test_connect_replaces_the_client(make_server: MakeServer, own_kernel: Callable[..., Kernel],
                                     server: ServerProcess, tiny_models: TinyModels) -> None:
    other = make_server(token_file=True)
    kernel = own_kernel(MYMPS_SERVER_PORT=str(server.port), MYMPS_TOKEN=server.token)
    ok(kernel.execute("%%mymps\nconnect_marker = 'first server'"))

    token_file = other.home / "token"
    run = ok(kernel.execute(f"%mymps connect 127.0.0.1:{other.port} --token-file {shlex.quote(str(token_file))}"))
    assert re.fullmatch(rf"Connected to 127\.0\.0\.1:{other.port}: mymps \S+ on cpu \(.*\), 0 model\(s\) loaded\n",
                        run.stdout), run.stdout
    assert ok(kernel.execute("%mymps health")).stdout.splitlines()[2] == "models  none"
    assert status_text(ok(kernel.execute("%mymps status"))).startswith(f"Server  127.0.0.1:{other.port}  ")
    gone = traceback_text(kernel.execute("%%mymps\nconnect_marker"))
    assert "NameError" in gone, "a new server, a new session"

    # A model loaded by its path, under that path as its name, on the new server.
    path = shlex.quote(str(tiny_models.diffusion))
    assert ok(kernel.execute(f"%mymps load {path} --kind diffusion")).stdout.startswith(f"Loaded {tiny_models.diffusion} on cpu")
    assert str(tiny_models.diffusion) in ok(kernel.execute("%mymps health")).stdout
    images = ok(kernel.execute(f"%mymps image {path} 'ignored by DDPM' --steps 2")).of_type("display_data")
    assert [png(m["content"]["data"]).size for m in images] == [(8, 8)]

    # Back to the first server: a new client, so a new (empty) session there.
    back = ok(kernel.execute(f"%mymps connect 127.0.0.1:{server.port} --token {server.token}"))
    assert back.stdout.startswith(f"Connected to 127.0.0.1:{server.port}")
    assert "NameError" in traceback_text(kernel.execute("%%mymps\nconnect_marker")), "connect starts a new session"
