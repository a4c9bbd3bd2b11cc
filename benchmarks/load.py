"""Load with nothing lost (issue 16, item 5): many sessions at once, plain and with the link cut.

One real server on loopback. Each phase runs, all at once:

* ``--sessions`` clients, each with its own session, each making ``--calls`` ``run`` calls of
  varied sizes (bytes, numpy arrays and small dicts, 16 B to 2 MiB, drawn log-uniformly from a
  seeded generator): every answer is compared with the value it must be, and every call also
  appends its number to a list in its session's namespace, which is pulled at the end: each
  number there once means each call ran exactly once (a request resent after a cut never runs
  twice);
* ``--streams`` streaming greedy generations from a model that never ends, started with the
  sessions: each must give ``--tokens`` tokens and the same text as a reference (while one runs
  it holds the device, and the sessions' calls wait behind it);
* one client polling ``GET /health`` every 50 ms: its median and p99 are reported.

The ``plain`` phase reaches the server directly. The ``cut`` phase puts the sessions behind
`proxy.Proxy` (``tests/proxy.py``), which cuts every connection through it every
``--cut-every`` seconds, as a dropped tunnel does; the sessions promise to resume, so nothing may
be lost or doubled. A cut generation stream ends in a ``ConnectionError`` by design (it has no
resume, see ``tests/test_faults.py``), so the streams and the poller keep reaching the server
directly.

The server's RSS is read before each phase (after a warm-up that made every kind of call) and
after it, once the phase's sessions are reaped (``--session-idle``): it must be within 10%.

Run: ``.venv/bin/python benchmarks/load.py [--sessions 16] [--calls 500] [--json PATH]``; the exit
status is 1 when a check failed. ``tests/test_load.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import QUIET_ENV, ServerProcess
from _machine import machine_line

os.environ.update(QUIET_ENV)

import httpx
import numpy as np
import psutil
from proxy import Proxy

from mymps_magic import Client
from mymps_magic.display import OutputSink

SESSION_IDLE_S = 3
HEALTH_EVERY_S = 0.05
RSS_SLACK = 0.10
PROMPT = "Machine learning"
MODEL = "load-llama"
OPENED = re.compile(r"session \w{8} opened")
REAPED = re.compile(r"session \w{8} reaped after \d+ s disconnected")


def transform(index: int, value: Any) -> Any:
    """What every call runs on the server: records that call ``index`` ran, answers a value
    derived from ``value`` (so an answer cannot be another call's by accident)."""
    load_seen.append(index)  # type: ignore[name-defined]  # noqa: F821  (the session's namespace)
    if isinstance(value, bytes):
        return (index, value[::-1])
    if isinstance(value, dict):
        return (index, {key: item + 1 for key, item in value.items()})
    return (index, value * 2)


def expected(index: int, value: Any) -> Any:
    if isinstance(value, bytes):
        return (index, value[::-1])
    if isinstance(value, dict):
        return (index, {key: item + 1 for key, item in value.items()})
    return (index, value * 2)


def payload(rng: random.Random) -> Any:
    """A value of a size drawn log-uniformly between 16 B and 2 MiB, of one of three kinds."""
    size = int(math.exp(rng.uniform(math.log(16), math.log(2 << 20))))
    kind = rng.random()
    if kind < 0.45:
        return rng.randbytes(size)
    if kind < 0.9:
        return np.random.default_rng(rng.getrandbits(32)).random(max(1, size // 4), dtype=np.float32)
    return {f"k{i}": i for i in range(max(1, min(size // 16, 2000)))}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2:
        return a[0] == b[0] and same(a[1], b[1])
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and np.array_equal(a, b)
    return bool(a == b)


@dataclass
class Phase:
    """What one phase saw; `failures` lists every check that did not hold, one line each."""

    name: str
    sessions: int
    calls: int
    answered: int = 0
    wrong: int = 0
    errors: int = 0
    ran_twice: int = 0
    never_ran: int = 0
    streams: int = 0
    stream_tokens: int = 0
    health_n: int = 0
    health_median_ms: float = 0.0
    health_p99_ms: float = 0.0
    health_max_ms: float = 0.0
    cuts: int = 0
    connections: int = 0
    seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    failures: list[str] = field(default_factory=list)


class Quiet(OutputSink):
    """Drops the server's notes ("waiting for job ... to finish"): with 16 sessions sharing one
    device most calls wait behind another session's, and says so, as it should."""

    def stream(self, name: str, text: str, request: int = 0) -> None:
        return None


def rss(server: ServerProcess) -> int:
    assert server.process is not None
    return int(psutil.Process(server.process.pid).memory_info().rss)


def all_reaped(server: ServerProcess) -> bool:
    """Every session the server opened is reaped (its log says so): none holds memory any more."""
    log = (server.home / "server.log").read_text()
    return len(REAPED.findall(log)) == len(OPENED.findall(log))


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class Load:
    """The server, the model and the reference text; `phase` runs one phase."""

    def __init__(self, server: ServerProcess, tokens: int) -> None:
        self.server = server
        self.tokens = tokens
        with Client(port=server.port, token=server.token) as client:
            self.reference = client.generate(MODEL, PROMPT, max_new_tokens=tokens, temperature=0)["text"]
            self._warm(client)

    def _warm(self, client: Client) -> None:
        """Every kind and size of call once, so the phases' RSS is compared with a server that
        has done this work before (its allocator's arenas grown, its modules imported)."""
        client.push(load_seen=[])
        rng = random.Random(-1)
        for index in range(60):
            value = payload(rng)
            client.run(transform, index, value)
        for _ in client.stream_generate(MODEL, PROMPT, max_new_tokens=self.tokens, temperature=0):
            pass

    def phase(self, name: str, sessions: int, calls: int, streams: int,
              cut_every: tuple[float, float] | None, seed: int) -> Phase:
        result = Phase(name, sessions, calls)
        if not wait_until(lambda: all_reaped(self.server), 60):
            result.failures.append("the sessions before this phase were not all reaped within 60 s")
        result.rss_before_mib = rss(self.server) / 2**20
        lock = threading.Lock()
        done = threading.Event()
        with Proxy(self.server.port) as link:
            port = link.port if cut_every else self.server.port
            workers = [threading.Thread(target=self._session, args=(port, calls, seed * 1000 + k, result, lock))
                       for k in range(sessions)]
            streamers = [threading.Thread(target=self._stream, args=(result, lock)) for _ in range(streams)]
            poller = threading.Thread(target=self._poll, args=(done, result))
            started = time.monotonic()
            poller.start()
            for thread in streamers:
                thread.start()
            cutting = link.cutting(cut_every, seed) if cut_every else contextlib.nullcontext()
            with cutting:
                for thread in workers:
                    thread.start()
                for thread in [*workers, *streamers]:
                    thread.join()
            done.set()
            poller.join()
            result.seconds = time.monotonic() - started
            result.cuts, result.connections = (link.severs, link.accepted) if cut_every else (0, 0)
        if not wait_until(lambda: all_reaped(self.server), 60):
            result.failures.append("the phase's sessions were not all reaped within 60 s")
        result.rss_after_mib = rss(self.server) / 2**20
        self._judge(result, streams, cut_every is not None)
        return result

    def _session(self, port: int, calls: int, seed: int, result: Phase, lock: threading.Lock) -> None:
        rng = random.Random(seed)
        answered = wrong = errors = 0
        problems: list[str] = []
        try:
            with Client(port=port, token=self.server.token) as client:
                client.session.sink = Quiet()
                client.push(load_seen=[])
                for index in range(calls):
                    value = payload(rng)
                    try:
                        answer = client.run(transform, index, value)
                    except Exception as exc:
                        errors += 1
                        problems.append(f"session {seed}: call {index}: {exc!r}")
                        continue
                    answered += 1
                    if not same(answer, expected(index, value)):
                        wrong += 1
                        problems.append(f"session {seed}: call {index}: a wrong answer")
                seen = client.pull("load_seen")
        except Exception as exc:
            problems.append(f"session {seed}: {exc!r}")
            seen = []
        counts: dict[int, int] = {}
        for index in seen:
            counts[index] = counts.get(index, 0) + 1
        with lock:
            result.answered += answered
            result.wrong += wrong
            result.errors += errors
            result.ran_twice += sum(1 for n in counts.values() if n > 1)
            result.never_ran += sum(1 for index in range(calls) if index not in counts)
            result.failures += problems[:5]

    def _stream(self, result: Phase, lock: threading.Lock) -> None:
        with Client(port=self.server.port, token=self.server.token) as client:
            try:
                stream = client.stream_generate(MODEL, PROMPT, max_new_tokens=self.tokens, temperature=0)
                text = "".join(stream)
                tokens = stream.stats["tokens_generated"] if stream.stats is not None else -1
            except Exception as exc:
                with lock:
                    result.errors += 1
                    result.failures.append(f"a stream: {exc!r}")
                return
        with lock:
            result.streams += 1
            result.stream_tokens += tokens
            if text != self.reference or tokens != self.tokens:
                result.wrong += 1
                result.failures.append(f"a stream gave {tokens} tokens and "
                                       f"{'the' if text == self.reference else 'not the'} reference text")

    def _poll(self, done: threading.Event, result: Phase) -> None:
        waits: list[float] = []
        with httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {self.server.token}"},
                          timeout=60, trust_env=False) as http:
            while not done.is_set():
                started = time.perf_counter()
                answer = http.get("/health")
                waits.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    result.errors += 1
                    result.failures.append(f"/health answered {answer.status_code}")
                done.wait(HEALTH_EVERY_S)
        ms = sorted(w * 1e3 for w in waits)
        result.health_n = len(ms)
        if ms:
            result.health_median_ms = statistics.median(ms)
            result.health_p99_ms = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            result.health_max_ms = ms[-1]

    def _judge(self, result: Phase, streams: int, cut: bool) -> None:
        expected_calls = result.sessions * result.calls
        checks = [
            (result.answered == expected_calls, f"{result.answered} of {expected_calls} calls answered"),
            (result.wrong == 0, f"{result.wrong} wrong answers"),
            (result.errors == 0, f"{result.errors} errors"),
            (result.ran_twice == 0, f"{result.ran_twice} calls ran twice"),
            (result.never_ran == 0, f"{result.never_ran} calls never ran"),
            (result.streams == streams, f"{result.streams} of {streams} streams finished"),
            (result.rss_after_mib <= result.rss_before_mib * (1 + RSS_SLACK),
             f"RSS grew {result.rss_before_mib:.0f} -> {result.rss_after_mib:.0f} MiB"),
            (not cut or result.cuts >= 2, f"only {result.cuts} cuts"),
        ]
        result.failures[:0] = [line for held, line in checks if not held]


def report(phases: list[Phase]) -> str:
    rows = ["| phase | calls answered | wrong / errors / twice / never | streams (tokens) | /health median | "
            "/health p99 | cuts (connections) | RSS before -> after | time |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        rows.append(f"| {p.name} | {p.answered:,} of {p.sessions} x {p.calls} | {p.wrong} / {p.errors} / {p.ran_twice} "
                    f"/ {p.never_ran} | {p.streams} ({p.stream_tokens:,}) | {p.health_median_ms:.1f} ms | "
                    f"{p.health_p99_ms:.1f} ms | {p.cuts} ({p.connections}) | {p.rss_before_mib:.0f} -> "
                    f"{p.rss_after_mib:.0f} MiB | {p.seconds:.1f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--calls", type=int, default=500, help="run calls per session")
    parser.add_argument("--streams", type=int, default=4, help="streaming generations, started with the sessions")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--cut-every", type=float, nargs=2, default=(2.0, 5.0), metavar=("LOW", "HIGH"),
                        help="seconds between two cuts in the cut phase (a random pause between the two)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from kernel_server.tinymodels import build_tiny_text_model

    with tempfile.TemporaryDirectory() as tmp:
        llama = build_tiny_text_model(Path(tmp) / "llama", arch="llama")
        for name in ("config.json", "generation_config.json"):  # an end no sample reaches: N tokens each time
            file = llama / name
            if file.exists():
                config = json.loads(file.read_text())
                config["eos_token_id"] = 10**6
                file.write_text(json.dumps(config))
        with ServerProcess(Path(tmp) / "home", options={"session_idle": SESSION_IDLE_S}) as server:
            with Client(port=server.port, token=server.token) as loader:
                loader.load_model(MODEL, path=str(llama), progress=False)
            load = Load(server, args.tokens)
            phases = [load.phase("plain", args.sessions, args.calls, args.streams, None, seed=1),
                      load.phase("cut", args.sessions, args.calls, args.streams, tuple(args.cut_every), seed=2)]
    print(machine_line())
    print(report(phases))
    failures = [f"{p.name}: {line}" for p in phases for line in p.failures]
    for line in failures:
        print("FAILED", line)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in phases], indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
