"""Remote execution (issue 4): run, submit, @remote, push, pull, run_cell, interrupt and reset.

Every test talks to the real shared ``server`` through a real `Client` and its ``/ws/session``
channel. Each test gets its own session (a new `Client`), so namespaces never leak between
tests. What the client renders goes to `RecordingSink`, our own `OutputSink` that records each
call and when it came, so tests can check that output arrives while the code still runs.

The server runs user code on its main thread, one job at a time for every session: a test that
leaves code running would hold up every later test, so the ``c`` fixture stops whatever its
session still runs when the test ends.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import pickle
import signal
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import cloudpickle  # type: ignore[import-untyped]
import numpy as np
import pytest
import torch

from kit import ServerProcess, TinyModels
from mymps_magic import Client, wire
from mymps_magic.display import OutputSink, RemoteValue
from mymps_magic.errors import (
    BadRequestError,
    CancelledError,
    ConnectionError,
    MympsError,
    PicklingError,
    RemoteError,
    RemoteNameError,
    VersionMismatchError,
)

MODEL = "session-tinynet"
# SPEC 3: running user code receives KeyboardInterrupt "within a second" of the interrupt.
INTERRUPT_BUDGET_S = 1.0
# How long a test waits for something that should take milliseconds before it fails.
PATIENCE_S = 10.0


class RecordingSink(OutputSink):
    """Records what the client would render, with the time each call came; draws nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[float, str, Any]] = []
        self._changed = threading.Condition()

    def _add(self, kind: str, payload: Any) -> None:
        with self._changed:
            self.events.append((time.monotonic(), kind, payload))
            self._changed.notify_all()

    def stream(self, name: str, text: str, request: int = 0) -> None:
        self._add("stream", (name, text))

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, request: int = 0) -> None:
        self._add("display", (data, metadata))

    def progress(self, request: int, fields: dict[str, Any]) -> None:
        self._add("progress", dict(fields))

    def finish(self, request: int) -> None:
        pass

    def text(self, name: str = "stdout") -> str:
        with self._changed:
            return "".join(p[1] for _, kind, p in self.events if kind == "stream" and p[0] == name)

    def of(self, kind: str) -> list[Any]:
        with self._changed:
            return [p for _, k, p in self.events if k == kind]

    def when(self, needle: str) -> float:
        """The time the stdout text first contained ``needle``, waiting for it if need be."""
        deadline = time.monotonic() + PATIENCE_S
        with self._changed:
            while True:
                seen = ""
                for at, kind, payload in self.events:
                    if kind == "stream" and payload[0] == "stdout":
                        seen += payload[1]
                        if needle in seen:
                            return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{needle!r} never arrived; stdout so far: {seen!r}")
                self._changed.wait(left)


def _stop_leftovers(client: Client) -> None:
    """Stop any job this client's session still runs or queues (a failed test's leftovers)."""
    if client._execution.channel is None:
        return
    sid = client.session.session_id
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        mine = [job for job in client.jobs() if job["session"] == sid]
        if not mine:
            return
        for job in mine:
            try:
                client.cancel(job["id"])
            except MympsError:
                pass
        time.sleep(0.05)


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def c(client: Client, sink: RecordingSink) -> Iterator[Client]:
    """The shared server's client with its session open and its output recorded."""
    client.session.sink = sink
    yield client
    _stop_leftovers(client)


@pytest.fixture
def make_client(server: ServerProcess) -> Iterator[Callable[[], Client]]:
    """More clients (sessions) on the shared server; stopped and closed afterwards."""
    made: list[Client] = []

    def make() -> Client:
        other = Client(host="127.0.0.1", port=server.port, token=server.token)
        other.session.sink = RecordingSink()
        made.append(other)
        return other

    yield make
    for other in made:
        _stop_leftovers(other)
        other.close()


@pytest.fixture(scope="module")
def model(server: ServerProcess, tiny_models: TinyModels) -> Iterator[str]:
    """The tiny checkpoint model, loaded on the shared server for this module."""
    with Client(host="127.0.0.1", port=server.port, token=server.token) as loader:
        loader.load_model(MODEL, kind="checkpoint", path=str(tiny_models.checkpoint),
                          model_class=tiny_models.checkpoint_class, progress=False)
        yield MODEL
        loader.unload_model(MODEL)


def wait_running(future: concurrent.futures.Future[Any]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not future.running():
        assert not future.done(), f"finished before it was seen running: {future.exception()!r}"
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.01)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    assert isinstance(exc, MympsError) and exc._render_traceback_() == [f"{type(exc).__name__}: {text}"]
    return text


# Functions that travel to the server (by value: this module is not installed there).

def add(a: int, b: int = 0, *, times: int = 1) -> int:
    return (a + b) * times


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def touch(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


def mark() -> int:
    """Appends to ``marks``, a list that only the remote namespace defines."""
    marks.append("ran")  # type: ignore[name-defined]  # noqa: F821
    return len(marks)  # type: ignore[name-defined]  # noqa: F821


OWN_GLOBAL = "the function's own"


def read_names() -> tuple[Any, ...]:
    return OWN_GLOBAL, pushed_here, str(DEVICE), MODEL in models  # type: ignore[name-defined]  # noqa: F821


def print_sleep_print(seconds: float) -> str:
    print("first", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(seconds)
    print("second")
    return "finished"


def fails(n: int) -> None:
    raise ValueError(f"bad value {n}")


class CustomError(Exception):
    pass


def raises_custom() -> None:
    raise CustomError("custom message")


# --------------------------------------------------------------------------------------------
# run, submit, @remote


def test_opening_a_session_warns_about_nothing(server: ServerProcess) -> None:
    """The client's own use of its libraries is current: no deprecation reaches the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Client(host="127.0.0.1", port=server.port, token=server.token) as fresh:
            assert fresh.run_cell("1 + 1") == 2
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]



def test_run_returns_the_value_of_the_call_made_on_the_server(c: Client) -> None:
    assert c.run(add, 2, 3, times=4) == 20
    assert c.run(add, 5) == 5
    assert c.run(os.getpid) != os.getpid()  # it really ran in the server process
    offset = 10
    assert c.run(lambda x: x + offset, 1) == 11  # closures travel with their cells
    assert c.run(dict, a=[1, 2], b={"c": None}) == {"a": [1, 2], "b": {"c": None}}


SCALE = 2
SHARED: list[int] = []


def scaled(x: int) -> int:
    return x * SCALE


def shared_items() -> list[int]:
    return SHARED


def test_each_call_sees_the_current_globals_closures_and_defaults(c: Client) -> None:
    """A function is sent again (not from the client's cache of pickled functions) whenever
    something it captured changed: a rebound global, a list changed in place, a closure cell,
    new defaults."""
    global SCALE
    assert c.run(scaled, 5) == 10
    SCALE = 3
    try:
        assert c.run(scaled, 5) == 15
    finally:
        SCALE = 2
    SHARED.append(1)
    assert c.run(shared_items) == [1]
    SHARED.append(2)
    assert c.run(shared_items) == [1, 2]
    step = 1

    def counter() -> int:
        return step

    assert c.run(counter) == 1
    step = 5
    assert c.run(counter) == 5

    def with_default(x: int = 1) -> int:
        return x

    assert c.run(with_default) == 1
    with_default.__defaults__ = (7,)
    assert c.run(with_default) == 7
    with_default.__code__ = scaled.__code__  # another body altogether
    assert c.run(with_default, 4) == 4 * SCALE


def test_submit_returns_a_future_with_the_value(c: Client) -> None:
    future = c.submit(sleep_then, 0.2, "slept")
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=PATIENCE_S) == "slept"
    assert future.done() and not future.cancelled()
    assert future.job_id  # the /jobs id it ran under
    # Several in flight at once come back, each with its own value.
    futures = [c.submit(add, i, times=2) for i in range(10)]
    assert [f.result(timeout=PATIENCE_S) for f in futures] == [2 * i for i in range(10)]
    done, _ = concurrent.futures.wait(futures, timeout=PATIENCE_S)
    assert len(done) == 10


def test_functions_sent_with_run_see_the_session_namespace(c: Client, model: str) -> None:
    c.push(pushed_here=[1, 2], OWN_GLOBAL="the namespace's")
    own, pushed, device, has_model = c.run(read_names)
    assert own == "the function's own"  # its own globals win over the namespace's
    assert (pushed, device, has_model) == ([1, 2], "cpu", True)
    c.push(marks=[])
    assert c.run(mark) == 1
    assert c.pull("marks") == ["ran"]  # the very object in the namespace


def test_remote_decorator_runs_the_function_on_the_server(c: Client) -> None:
    @c.remote
    def where(x: int, *, label: str = "pid") -> tuple[str, int, int]:
        """A function that says where it ran."""
        return label, x * 2, os.getpid()

    assert where.__name__ == "where" and where.__doc__ == "A function that says where it ran."
    label, doubled, pid = where(21, label="here")
    assert (label, doubled) == ("here", 42)
    assert pid != os.getpid()


# --------------------------------------------------------------------------------------------
# push, pull, run_cell, reset and the namespace


def test_push_and_pull_use_the_session_namespace(c: Client) -> None:
    c.push(x=1, name="mymps", items=[1, 2, 3], nested={"a": (1, 2)})
    assert c.pull("x") == 1
    assert c.pull("name", "items") == ("mymps", [1, 2, 3])
    assert c.pull("nested") == {"a": (1, 2)}
    assert c.run_cell("x + len(items)") == 4
    c.run_cell("y = x * 100")
    assert c.pull("y") == 100
    c.push(x=2)  # pushing again replaces
    assert c.pull("x", "y") == (2, 100)
    with pytest.raises(BadRequestError):
        c.pull()


def test_run_cell_returns_the_last_expression_and_keeps_the_namespace(c: Client) -> None:
    assert c.run_cell("1 + 1") == 2
    assert c.run_cell("a = 5") is None  # no expression at the end: no value
    assert c.run_cell("a") == 5  # the namespace persists from cell to cell
    source = """
        def square(v):
            return v * v

        total = 0
        for i in range(4):
            total += square(i)
        total, square(a)
    """
    assert c.run_cell(textwrap.dedent(source)) == (14, 25)
    assert c.run_cell("square(3)") == 9  # a function defined in a cell stays defined
    assert c.run_cell("_") == 9  # the last value, as IPython keeps it
    assert c.run_cell("print('shown')\nNone") is None


def test_namespace_provides_device_torch_np_display_and_progress(c: Client) -> None:
    source = """
        import collections.abc
        (isinstance(DEVICE, torch.device), str(DEVICE), torch.__name__, np.__name__,
         callable(display), callable(progress), isinstance(models, collections.abc.Mapping))
    """
    is_device, device, torch_name, np_name, has_display, has_progress, mapping = c.run_cell(textwrap.dedent(source))
    assert is_device and device == "cpu"  # the kit's servers run --device cpu
    assert (torch_name, np_name) == ("torch", "numpy")
    assert has_display and has_progress and mapping
    assert c.run_cell("torch.ones(2, device=DEVICE).sum().item()") == 2.0


def test_models_holds_the_loaded_model_objects(c: Client, model: str) -> None:
    kind, count, in_models = c.run_cell(
        f"m = models[{model!r}]\n(type(m).__name__, sum(p.numel() for p in m.parameters()), {model!r} in models)"
    )
    assert (kind, in_models) == ("TinyNet", True)
    listed = {m["name"]: m for m in c.models()}
    assert listed[model]["parameters"] == count
    # The object works as a model: its forward pass on the server gives (N, 2).
    assert c.run_cell("tuple(m(torch.zeros(3, 4)).shape)") == (3, 2)
    with pytest.raises(RemoteError) as info:
        c.run_cell("models['no-such-model']")
    assert info.value.ename != "KeyboardInterrupt"


def test_reset_clears_the_namespace_and_keeps_the_models(c: Client, model: str) -> None:
    c.push(x=1)
    c.run_cell("y = 2")
    c.reset()
    with pytest.raises(RemoteNameError):
        c.pull("x")
    with pytest.raises(RemoteNameError):
        c.pull("y")
    assert model in {m["name"] for m in c.models()}
    assert c.run_cell(f"type(models[{model!r}]).__name__, str(DEVICE), np.__name__") == ("TinyNet", "cpu", "numpy")
    c.push(x=3)  # the fresh namespace works as before
    assert c.run_cell("x + 1") == 4


# --------------------------------------------------------------------------------------------
# numpy arrays and torch tensors


ARRAYS: dict[str, np.ndarray] = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "float64": np.linspace(-1, 1, 9).reshape(3, 3),
    "float16": np.array([0.5, -2.25, 65504], dtype=np.float16),
    "int64": np.array([[-(2**62), 0, 2**62]], dtype=np.int64),
    "uint8": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "bool": np.array([True, False, True]),
    "complex64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "zero-d": np.array(3.5),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,  # not contiguous
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_numpy_arrays_round_trip(c: Client, name: str) -> None:
    array = ARRAYS[name]
    c.push(a=array)
    pulled = c.pull("a")
    assert isinstance(pulled, np.ndarray)
    assert pulled.dtype == array.dtype and pulled.shape == array.shape
    np.testing.assert_array_equal(pulled, array)
    assert pulled.flags.writeable
    pulled[...] = 0  # writable for real, not just flagged
    # Through run, both ways, and computed remotely.
    back = c.run(lambda v: v.copy(), array)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert c.run_cell("(str(a.dtype), a.shape)") == (str(array.dtype), array.shape)


def test_large_arrays_cross_in_chunks(c: Client) -> None:
    big = np.random.default_rng(0).standard_normal(3 * wire.CHUNK // 8 + 123)  # about 3 chunks
    c.push(big=big)
    assert c.run_cell("float(big.sum())") == pytest.approx(float(big.sum()))
    np.testing.assert_array_equal(c.pull("big"), big)
    doubled = c.run(np.multiply, big, 2.0)
    np.testing.assert_array_equal(doubled, big * 2.0)


TENSORS: dict[str, torch.Tensor] = {
    "float32": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "float16": torch.tensor([0.5, -2.25, 65504.0], dtype=torch.float16),
    "bfloat16": torch.tensor([[1.5, -3.0], [1e30, -7.25]], dtype=torch.bfloat16),
    "int64": torch.tensor([-(2**62), 0, 2**62]),
    "uint8": torch.arange(10, dtype=torch.uint8),
    "bool": torch.tensor([True, False]),
    "zero-d": torch.tensor(2.5),
    "transposed": torch.arange(6.0).reshape(2, 3).t(),
    "requires-grad": torch.ones(3, requires_grad=True),
    "parameter": torch.nn.Parameter(torch.full((2, 2), 3.0)),
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_torch_tensors_round_trip_as_tensors(c: Client, name: str) -> None:
    tensor = TENSORS[name]
    c.push(t=tensor)
    assert c.run_cell("(isinstance(t, torch.Tensor), str(t.dtype), tuple(t.shape))") == (
        True, str(tensor.dtype), tuple(tensor.shape))
    pulled = c.pull("t")
    assert isinstance(pulled, torch.Tensor)
    assert pulled.dtype == tensor.dtype and pulled.shape == tensor.shape
    assert torch.equal(pulled, tensor.detach())
    pulled.zero_()  # writable memory, no warning about non-writable arrays
    back = c.run(lambda v: v, tensor)
    assert isinstance(back, torch.Tensor) and back.dtype == tensor.dtype
    assert torch.equal(back, tensor.detach())


def test_tensors_made_on_the_server_come_back_as_tensors(c: Client) -> None:
    out = c.run_cell("{'ids': torch.arange(5), 'half': torch.ones(2, 2, dtype=torch.bfloat16) / 3, 'n': 1}")
    assert torch.equal(out["ids"], torch.arange(5))
    assert out["half"].dtype == torch.bfloat16
    assert torch.equal(out["half"], torch.ones(2, 2, dtype=torch.bfloat16) / 3)
    assert out["n"] == 1
    mixed = c.run(lambda: (np.zeros(2), torch.zeros(2), [torch.ones(1)]))
    assert isinstance(mixed[0], np.ndarray) and isinstance(mixed[1], torch.Tensor)
    assert isinstance(mixed[2][0], torch.Tensor)


# --------------------------------------------------------------------------------------------
# Output while the code runs: streams, displays, progress


def test_submitted_output_arrives_before_the_call_finishes(c: Client, sink: RecordingSink) -> None:
    future = c.submit(print_sleep_print, 2.0)
    finished: list[float] = []
    future.add_done_callback(lambda _: finished.append(time.monotonic()))
    first = sink.when("first")
    assert not future.done(), "the first line came only with the result"
    assert future.result(timeout=PATIENCE_S) == "finished"
    assert finished and finished[0] - first > 1.5  # it came while the server slept
    assert sink.text("stdout") == "first\nsecond\n"
    assert sink.text("stderr") == "to stderr\n"


def test_run_cell_output_arrives_while_the_cell_runs(c: Client, sink: RecordingSink) -> None:
    source = "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')\n'value'"
    assert c.run_cell(source) == "value"
    returned = time.monotonic()
    assert returned - sink.when("first") > 1.5
    assert sink.text() == "first\nsecond\n"


def test_printed_lines_arrive_whole(c: Client, sink: RecordingSink) -> None:
    """A line goes when it is complete, as on a line-buffered terminal: `print` writes its
    text and its newline apart, and the two must show as one piece (a notebook may otherwise
    draw them as two outputs). A line without its newline goes on a flush, after 0.2 s, and at the end."""
    source = ("import sys, time\n"
              "sys.stdout.write('half'); sys.stdout.write(' and half\\n')\n"
              "print('partial', end=''); sys.stdout.flush(); time.sleep(0.3)\n"
              "print(' tail', end='')")
    c.run_cell(source)
    pieces = [text for name, text in sink.of("stream") if name == "stdout"]
    assert "".join(pieces) == "half and half\npartial tail"
    assert not [p for p in pieces if p.endswith("half")], pieces  # the line was never cut
    assert pieces[-1] == " tail" and pieces[-2].endswith("partial"), pieces  # the flush sent it


def test_run_cell_prints_to_the_local_stdout_and_stderr(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    # The default sink, outside a kernel: text goes to sys.stdout / sys.stderr.
    assert client.run_cell("import sys\nprint('out line')\nprint('err line', file=sys.stderr)\n7") == 7
    captured = capsys.readouterr()
    assert "out line\n" in captured.out and "err line" not in captured.out
    assert "err line\n" in captured.err


def test_output_keeps_its_order_with_displays(c: Client, sink: RecordingSink) -> None:
    source = """
        import sys, threading
        for i in range(50):
            print(i)
        print('warn', file=sys.stderr)

        class Html:
            def _repr_html_(self):
                return '<b>bold</b>'

        display(Html())
        t = threading.Thread(target=print, args=('from a thread',))
        t.start(); t.join()
        print('after')
    """
    c.run_cell(textwrap.dedent(source))
    expected = "".join(f"{i}\n" for i in range(50))
    assert sink.text() == expected + "from a thread\nafter\n"
    assert sink.text("stderr") == "warn\n"
    kinds = [(kind, payload[0] if kind == "stream" else None) for _, kind, payload in sink.events]
    first_display = kinds.index(("display", None))
    # Everything printed before display() arrived before it; what came after, after it.
    before = "".join(p[1] for _, k, p in sink.events[:first_display] if k == "stream" and p[0] == "stdout")
    assert before == expected
    data, _ = sink.of("display")[0]
    assert data["text/html"] == "<b>bold</b>"
    assert "Html object" in data["text/plain"]


def test_display_sends_pngs_of_images_and_figures(c: Client, sink: RecordingSink) -> None:
    pytest.importorskip("matplotlib")
    source = """
        from PIL import Image
        from matplotlib.figure import Figure

        display(Image.new('RGB', (12, 8), (255, 0, 0)))
        fig = Figure(figsize=(2, 1))
        fig.add_subplot().plot([1, 3, 2])
        display(fig, 'two objects')
    """
    c.run_cell(textwrap.dedent(source))
    displays = [data for data, _ in sink.of("display")]
    assert len(displays) == 3
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(displays[0]["image/png"])))
    assert image.size == (12, 8) and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    figure = base64.b64decode(displays[1]["image/png"])
    assert figure.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(figure)).size[0] > 50
    assert displays[2] == {"text/plain": "'two objects'"}


def test_progress_and_tqdm_bars_report_their_progress(c: Client, sink: RecordingSink) -> None:
    source = """
        import time
        from tqdm import tqdm
        total = 0
        for i in progress(range(6), desc='wrapped'):
            time.sleep(0.06)
            total += i
        for i in tqdm(range(4), desc='plain', mininterval=0):
            time.sleep(0.02)
        with progress(total=10, desc='manual') as bar:
            for _ in range(5):
                bar.update(2)
        total
    """
    assert c.run_cell(textwrap.dedent(source)) == 15
    events = sink.of("progress")
    bars: dict[int, list[dict[str, Any]]] = {}
    for fields in events:
        bars.setdefault(fields["bar"], []).append(fields)
    assert len(bars) == 3, events
    by_desc = {seq[0]["desc"]: seq for seq in bars.values()}
    assert set(by_desc) == {"wrapped", "plain", "manual"}
    for desc, total in (("wrapped", 6), ("plain", 4), ("manual", 10)):
        seq = by_desc[desc]
        counts = [f["n"] for f in seq]
        assert counts == sorted(counts), f"{desc}: n went backwards: {counts}"
        assert all(f["total"] == total for f in seq)
        assert seq[-1]["closed"] and seq[-1]["n"] == total
        assert not any(f["closed"] for f in seq[:-1])
    assert len(by_desc["plain"]) >= 3  # a bar moves while it runs, not only at the end
    # The bars draw on the client, never as text on the server's stderr.
    assert "it/s" not in sink.text("stderr") and "%|" not in sink.text("stderr")


def test_progress_in_a_submitted_function(c: Client, sink: RecordingSink) -> None:
    def loop(n: int) -> int:
        from tqdm import tqdm  # type: ignore[import-untyped]

        for _ in tqdm(range(n), mininterval=0):
            time.sleep(0.01)
        return n

    assert c.submit(loop, 5).result(timeout=PATIENCE_S) == 5
    events = sink.of("progress")
    assert events and events[-1]["closed"] and events[-1]["n"] == 5


# --------------------------------------------------------------------------------------------
# Errors


def test_a_cell_that_raises_gives_remote_error_with_the_remote_traceback(c: Client) -> None:
    source = "def inner(v):\n    return v / 0\n\nx = 1\ninner(x)\n"
    with pytest.raises(RemoteError) as info:
        c.run_cell(source)
    err = info.value
    assert (err.ename, err.evalue) == ("ZeroDivisionError", "division by zero")
    assert type(err).__name__ == "ZeroDivisionError"  # a RemoteError named after the remote type
    assert str(err) == "division by zero"  # as a local one: the type name is printed beside it
    assert err.message == "ZeroDivisionError: division by zero"
    text = "".join(err.traceback)
    assert text.startswith("Traceback (most recent call last):")
    assert "<mymps-cell-" in text and "line 5, in <module>" in text and "line 2, in inner" in text
    assert "    inner(x)" in text and "    return v / 0" in text  # the user's own lines
    assert "kernel_server" not in text and "mymps_magic" not in text
    lines = err._render_traceback_()
    assert lines == [line for chunk in err.traceback for line in chunk.splitlines()]
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert isinstance(err, MympsError)


def test_a_function_that_raises_gives_remote_error(c: Client) -> None:
    with pytest.raises(RemoteError) as info:
        c.run(fails, 7)
    err = info.value
    assert (err.ename, err.evalue) == ("ValueError", "bad value 7")
    text = "".join(err.traceback)
    # cloudpickle sends the code without its file; the client puts the file and the source
    # line back, so the frame reads as a local one would.
    assert f'File "{__file__}", line {fails.__code__.co_firstlineno + 1}, in fails' in text
    assert 'raise ValueError(f"bad value {n}")' in text
    assert "kernel_server" not in text and "mymps_magic" not in text and "<dynamic-code>" not in text
    future = c.submit(raises_custom)
    assert isinstance(future.exception(timeout=PATIENCE_S), RemoteError)
    assert "raise CustomError" in "".join(future.exception().traceback)
    with pytest.raises(RemoteError) as custom:
        future.result()
    assert (custom.value.ename, custom.value.evalue) == ("CustomError", "custom message")
    assert c.run(add, 1, 1) == 2  # the session goes on


def test_a_syntax_error_shows_only_the_cell(c: Client) -> None:
    with pytest.raises(RemoteError) as info:
        c.run_cell("x = 1\ny = (\n")
    err = info.value
    assert err.ename == "SyntaxError"
    text = "".join(err.traceback)
    assert "<mymps-cell-" in text and "y = (" in text
    # A syntax error in a notebook cell shows the cell, not the parser's own frames.
    files = [line for line in text.splitlines() if line.lstrip().startswith('File "')]
    assert all("<mymps-cell-" in line for line in files), files


def test_an_unpicklable_return_value_is_a_one_line_pickling_error(c: Client) -> None:
    with pytest.raises(PicklingError) as info:
        c.run(lambda: threading.Lock())
    assert "pickle" in one_line(info.value)
    assert isinstance(info.value, pickle.PicklingError)
    c.run_cell("import threading\nlock = threading.Lock()")
    with pytest.raises(PicklingError) as pulled:
        c.pull("lock")
    assert "'lock'" in one_line(pulled.value)
    # A cell's unpicklable last value still shows, through its remote repr.
    value = c.run_cell("lock")
    assert isinstance(value, RemoteValue) and "lock" in repr(value)
    assert c.run_cell("lock.locked()") is False  # the session goes on


def test_unpicklable_arguments_and_pushes_fail_locally_in_one_line(c: Client) -> None:
    with pytest.raises(PicklingError) as info:
        c.run(len, threading.Lock())
    one_line(info.value)
    with pytest.raises(PicklingError) as pushed:
        c.push(ok=1, bad=threading.Lock())
    assert "'bad'" in one_line(pushed.value)
    with pytest.raises(RemoteNameError):
        c.pull("ok")  # nothing of a failed push arrived


def test_pull_of_an_undefined_name_is_a_one_line_remote_name_error(c: Client) -> None:
    with pytest.raises(RemoteNameError) as info:
        c.pull("never_defined")
    assert "'never_defined'" in one_line(info.value)
    assert isinstance(info.value, NameError)
    c.push(defined=1)
    with pytest.raises(RemoteNameError) as several:
        c.pull("defined", "missing_one")
    text = one_line(several.value)
    assert "'missing_one'" in text and "'defined'" not in text


def test_version_mismatch_refuses_pickled_code_and_keeps_cells_and_data(
    client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wire.frames, "PYTHON_VERSION", "3.8")
    assert client._execution.channel is None  # the session connects below, with the patched version
    mismatch = client.session.mismatch
    assert mismatch and "3.8" in mismatch and f"{sys.version_info[0]}.{sys.version_info[1]}" in mismatch
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "3.8" in warning  # warned once, in one line

    with pytest.raises(VersionMismatchError) as info:
        client.run(add, 1, 2)
    assert one_line(info.value) == mismatch
    with pytest.raises(VersionMismatchError):
        client.submit(add, 1, 2)

    @client.remote
    def remote_add(a: int) -> int:
        return a + 1

    with pytest.raises(VersionMismatchError):
        remote_add(1)
    # The server refuses pickled code on its own too, whatever a client sends.
    with pytest.raises(VersionMismatchError):
        client.session.call("run", buffers=wire.dumps((add, (1, 2), {})))

    assert client.run_cell("x = 40\nx + 2") == 42
    client.push(arr=np.arange(4), t=torch.ones(2), plain={"k": [1, 2]})
    arr, t, plain = client.pull("arr", "t", "plain")
    np.testing.assert_array_equal(arr, np.arange(4))
    assert torch.equal(t, torch.ones(2)) and plain == {"k": [1, 2]}


# --------------------------------------------------------------------------------------------
# The user's own modules travel by value


@pytest.fixture
def local_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A module of the user's own, importable here only: the server has no copy of it."""
    name = f"user_helpers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        SCALE = 3


        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def norm(self):
                return (self.x ** 2 + self.y ** 2) ** 0.5


        def _helper(v):
            return v * SCALE


        def scaled(v):
            return _helper(v) + 1


        def make_point(x, y):
            return Point(x, y)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)
    try:
        cloudpickle.unregister_pickle_by_value(module)
    except ValueError:
        pass


def test_functions_from_a_local_module_travel_by_value(c: Client, local_module: Any) -> None:
    name = local_module.__name__
    with pytest.raises(RemoteError) as info:
        c.run_cell(f"import {name}")
    assert info.value.ename == "ModuleNotFoundError"  # the server cannot import it
    assert c.run(local_module.scaled, 2) == 7  # with the helper and constant it uses
    assert c.run(lambda p: p.norm(), local_module.Point(3, 4)) == 5.0
    assert c.run(local_module.make_point(6, 8).norm) == 10.0
    point = c.run(local_module.make_point, 1, 2)
    assert (point.x, point.y) == (1, 2)


def test_local_objects_inside_containers_travel_by_value(c: Client, local_module: Any) -> None:
    points = [local_module.Point(3, 4), local_module.Point(6, 8)]
    assert c.run(lambda ps: sum(p.norm() for p in ps), points) == 15.0


def test_pushed_instances_of_local_classes_travel_by_value(c: Client, local_module: Any) -> None:
    c.push(p=local_module.Point(3, 4))
    assert c.run_cell("p.norm()") == 5.0


# --------------------------------------------------------------------------------------------
# Interrupt and cancel


SPINNING_CELLS = {
    "busy-loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)",
    "torch-loop": "x = torch.randn(256, 256)\nwhile True:\n    x = torch.tanh(x @ x)",
    "blocking-read": "import socket\na, b = socket.socketpair()\na.recv(1)",
    "event-wait": "import threading\nthreading.Event().wait()",
}


@pytest.mark.parametrize("kind", list(SPINNING_CELLS))
def test_interrupt_stops_a_running_cell_within_a_second(c: Client, sink: RecordingSink, kind: str) -> None:
    c.push(keep=123)
    asked: list[float] = []

    def interrupt_when_running() -> None:
        sink.when("spinning")
        asked.append(time.monotonic())
        c.interrupt()

    interrupter = threading.Thread(target=interrupt_when_running, daemon=True)
    interrupter.start()
    with pytest.raises(RemoteError) as info:
        # The timeout only keeps a broken interrupt from hanging the suite; the time check fails.
        c.run_cell("print('spinning', flush=True)\n" + SPINNING_CELLS[kind], timeout=20)
    stopped = time.monotonic()
    interrupter.join(PATIENCE_S)
    assert info.value.ename == "KeyboardInterrupt"
    assert asked and stopped - asked[0] < INTERRUPT_BUDGET_S
    assert "kernel_server" not in "".join(info.value.traceback)
    # The session and its namespace survive.
    assert c.pull("keep") == 123
    assert c.run_cell("keep + 1") == 124


def test_interrupt_stops_a_submitted_call(c: Client) -> None:
    c.push(keep="still here")
    future = c.submit(time.sleep, 60)
    wait_running(future)
    asked = time.monotonic()
    c.interrupt()
    err = future.exception(timeout=PATIENCE_S)
    assert isinstance(err, RemoteError) and err.ename == "KeyboardInterrupt"
    assert time.monotonic() - asked < INTERRUPT_BUDGET_S
    assert c.pull("keep") == "still here"
    assert c.run(add, 2, 2) == 4


def test_an_interrupt_with_nothing_running_does_not_hit_the_next_call(c: Client) -> None:
    c.interrupt()
    time.sleep(0.2)
    assert c.run_cell("import time\ntime.sleep(0.3)\n'not interrupted'") == "not interrupted"
    assert c.run(sleep_then, 0.3, "fine") == "fine"


def test_run_cell_timeout_interrupts_the_cell(c: Client) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        c.run_cell("import time\ntime.sleep(60)", timeout=0.5)
    assert info.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - started < 0.5 + INTERRUPT_BUDGET_S + 0.5


@pytest.mark.parametrize("timeout", [20, None], ids=["with-timeout", "without"])
def test_ctrl_c_while_waiting_interrupts_the_remote_code(c: Client, sink: RecordingSink, timeout: float | None) -> None:
    """The notebook's stop button is a SIGINT in the thread that waits for the cell (which reads
    the socket itself: a Ctrl-C that lands while it waits for a message keeps the connection)."""
    c.run_cell("1")
    socket_before = c.session._ws
    main = threading.get_ident()
    pressed: list[float] = []

    def press_ctrl_c() -> None:
        sink.when("spinning")
        # Pressed once the waiting thread is surely blocked: a signal that lands in the
        # microseconds before it blocks is handled only when the wait returns (CPython).
        time.sleep(0.3)
        pressed.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    with pytest.raises(RemoteError) as info:
        c.run_cell("import time\nprint('spinning', flush=True)\ntime.sleep(60)", timeout=timeout)
    stopped = time.monotonic()
    presser.join(PATIENCE_S)
    assert info.value.ename == "KeyboardInterrupt"
    assert pressed and stopped - pressed[0] < INTERRUPT_BUDGET_S
    assert c.run_cell("'alive'") == "alive"
    assert c.session._ws is socket_before


def test_cancel_of_a_queued_call_returns_true_and_it_never_runs(c: Client, tmp_path: Path) -> None:
    never = tmp_path / "never"
    c.push(marks=[], keep=[1, 2])
    blocker = c.submit(sleep_then, 1.0, "blocker")
    queued = c.submit(mark)
    queued_file = c.submit(touch, str(never))
    assert queued.cancel() is True
    assert queued_file.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=PATIENCE_S)
    assert blocker.result(timeout=PATIENCE_S) == "blocker"
    assert c.run(add, 1) == 1  # the queue has moved past where they would have run
    assert c.pull("marks") == []
    assert not never.exists()
    assert c.pull("keep") == [1, 2]
    # Both would have left their mark had they run.
    assert c.run(mark) == 1 and c.run(touch, str(never)) == "ran" and never.exists()


def test_cancel_of_a_call_queued_behind_a_push_returns_true(c: Client) -> None:
    """A call waiting behind this session's push (which waits for the session's running job)
    has not started: cancelling it must drop it, as for any queued call."""
    c.push(marks=[])
    blocker = c.submit(sleep_then, 1.0, "blocker")
    wait_running(blocker)
    pusher = threading.Thread(target=c.push, kwargs={"later": 1}, daemon=True)
    pusher.start()
    time.sleep(0.2)  # the push is in the session's lane, waiting for the blocker
    queued = c.submit(mark)
    assert queued.cancel() is True
    pusher.join(PATIENCE_S)
    assert blocker.result(timeout=PATIENCE_S) == "blocker"
    assert c.pull("later") == 1
    assert c.run(add, 1) == 1
    assert c.pull("marks") == []


def test_cancel_of_a_running_call_returns_false_and_it_finishes(c: Client) -> None:
    future = c.submit(sleep_then, 1.0, "finished anyway")
    wait_running(future)
    assert future.cancel() is False
    assert not future.cancelled()
    assert future.result(timeout=PATIENCE_S) == "finished anyway"
    assert future.cancel() is False  # a finished call cannot be cancelled either


def test_cancelling_the_job_stops_running_session_code(c: Client) -> None:
    c.push(keep=5)
    future = c.submit(time.sleep, 60)
    wait_running(future)
    job_id = future.job_id
    assert job_id is not None and job_id in {job["id"] for job in c.jobs()}
    asked = time.monotonic()
    c.cancel(job_id)
    assert isinstance(future.exception(timeout=PATIENCE_S), CancelledError)
    assert time.monotonic() - asked < INTERRUPT_BUDGET_S
    assert c.pull("keep") == 5


def test_close_fails_the_calls_in_flight(server: ServerProcess) -> None:
    other = Client(host="127.0.0.1", port=server.port, token=server.token)
    future = other.submit(sleep_then, 0.5, "late")
    other.close()
    assert isinstance(future.exception(timeout=PATIENCE_S), ConnectionError)


# --------------------------------------------------------------------------------------------
# Several sessions, and several threads on one client


def test_sessions_have_their_own_namespaces_and_share_the_models(
    c: Client, make_client: Callable[[], Client], model: str
) -> None:
    other = make_client()
    assert other.session.session_id != c.session.session_id
    c.push(x=1)
    other.push(x=2)
    assert (c.pull("x"), other.pull("x")) == (1, 2)
    c.run_cell("only_here = True")
    with pytest.raises(RemoteNameError):
        other.pull("only_here")
    same = f"id(models[{model!r}])"
    assert c.run_cell(same) == other.run_cell(same)
    c.reset()
    assert other.pull("x") == 2  # one session's reset leaves the other alone


def test_jobs_show_the_session_of_each_job(c: Client, make_client: Callable[[], Client]) -> None:
    other = make_client()
    mine = c.submit(sleep_then, 1.5, "mine")
    theirs = other.submit(sleep_then, 1.5, "theirs")
    wait_running(mine)
    deadline = time.monotonic() + 1.0  # while mine runs: the other session's request reaches the queue
    while True:
        jobs = c.jobs()
        by_session = {job["session"]: job for job in jobs}
        if other.session.session_id in by_session or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert {c.session.session_id, other.session.session_id} <= set(by_session), jobs
    assert by_session[c.session.session_id]["id"] == mine.job_id
    assert by_session[c.session.session_id]["state"] == "running"
    assert by_session[other.session.session_id]["state"] == "queued"
    assert {job["kind"] for job in jobs if job["session"] in by_session} <= {"run", "cell"}
    assert theirs.cancel() is True
    assert mine.result(timeout=PATIENCE_S) == "mine"


def wait_for_file(path: str, value: Any) -> Any:
    while not os.path.exists(path):
        time.sleep(0.01)
    return value


def test_push_and_pull_never_wait_for_another_sessions_job(c: Client, make_client: Callable[[], Client],
                                                           tmp_path: Path) -> None:
    """The busy job ends only once the push and pull are done: had they waited for it, they
    would never return (seen as a hang, not as a slow machine)."""
    other = make_client()
    release = tmp_path / "release"
    busy = c.submit(wait_for_file, str(release), "busy")
    wait_running(busy)
    answered: list[Any] = []
    moving = threading.Thread(target=lambda: (other.push(x=np.arange(1000)), answered.append(other.pull("x"))),
                              daemon=True)
    moving.start()
    moving.join(60)
    assert answered and answered[0].sum() == 499500, "push and pull waited for another session's job"
    assert not busy.done()
    other.interrupt()  # another session's interrupt leaves this one's code alone
    release.touch()
    assert busy.result(timeout=PATIENCE_S) == "busy"


def test_a_sessions_requests_run_in_order(c: Client, make_client: Callable[[], Client]) -> None:
    cell: list[Any] = []
    runner = threading.Thread(target=lambda: cell.append(c.run_cell(
        "import time\nprint('started', flush=True)\ntime.sleep(1)\ny = 'set by the cell'\ny")))
    runner.start()
    c.session.sink.when("started")  # type: ignore[attr-defined]
    assert c.pull("y") == "set by the cell"  # waited for the cell sent before it
    runner.join(PATIENCE_S)
    assert cell == ["set by the cell"]


def test_one_client_used_from_several_threads_at_first_use(server: ServerProcess) -> None:
    """Threads that start using a fresh client together share its one session."""
    with Client(host="127.0.0.1", port=server.port, token=server.token) as shared:
        barrier = threading.Barrier(6)
        failures: list[BaseException] = []

        def push(i: int) -> None:
            barrier.wait()
            try:
                shared.push(**{f"v{i}": i})
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PATIENCE_S)
        assert not failures and not any(t.is_alive() for t in threads)
        assert shared.pull(*[f"v{i}" for i in range(6)]) == tuple(range(6))


def test_a_request_overtaken_by_another_threads_request_still_runs(
    c: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A takes a request id, thread B takes the next one and sends first (a big frame
    to encode, or just the scheduler, makes A late): A's request must still be answered."""
    encode = wire.encode_frame
    late = threading.local()

    def slow_encode(frame: wire.Frame) -> list[bytes | memoryview]:
        if getattr(late, "on", False):
            time.sleep(0.3)  # this thread is slow to put its frame on the wire
        return encode(frame)

    monkeypatch.setattr(wire, "encode_frame", slow_encode)

    def late_push() -> None:
        late.on = True
        c.push(first=1)

    pusher = threading.Thread(target=late_push, daemon=True)
    pusher.start()
    time.sleep(0.1)  # its id is taken, its frame not sent yet
    c.push(second=2)  # a later id, on the wire first
    pusher.join(PATIENCE_S)
    assert not pusher.is_alive(), "the overtaken request was never answered"
    assert c.pull("first", "second") == (1, 2)


def test_one_session_used_from_several_threads_at_once(c: Client) -> None:
    """Large and small requests from several threads: none is lost, none is mixed up."""
    big = np.random.default_rng(1).standard_normal(wire.CHUNK // 8 - 4096)  # one large message
    huge = np.random.default_rng(2).standard_normal(2 * wire.CHUNK // 8)  # a chunked frame
    failures: list[BaseException] = []
    done = threading.Event()

    def push_large() -> None:
        try:
            for _ in range(15):
                c.push(big=big, huge=huge)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    def push_small() -> None:
        try:
            i = 0
            while not done.is_set():
                c.push(small=i)
                assert c.pull("small") == i
                i += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=push_large, daemon=True), threading.Thread(target=push_small, daemon=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    assert not hung, "a request never got its answer"
    assert not failures, failures
    big_back, huge_back = c.pull("big", "huge")
    np.testing.assert_array_equal(big_back, big)
    np.testing.assert_array_equal(huge_back, huge)
