"""`mymps demo`: the whole path on one machine, with no hub access and no Mac.

It builds the tiny text model (`kernel_server.tinymodels`, the one the tests load too), starts a
real server subprocess on a free loopback port (`localserver.LocalServer`, as the tests and the
benchmarks do), and drives it through the `Client`: load (with a progress bar), generate, stream.

Everything heavy (torch, transformers, tokenizers) is imported inside `run`, after the check that
the server extra is there: importing this module stays as light as the rest of the client.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mymps_magic.cli.localserver import LocalServer
from mymps_magic.client import Client
from mymps_magic.errors import MympsError

SERVER_EXTRA = ("torch", "transformers", "tokenizers", "fastapi", "uvicorn")
PROMPT = "Once upon a time"
# Offline, and no warning (or deadlock) from tokenizers' thread pool when the server forks.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOG_TAIL_CHARS = 2000


def run() -> int:
    """Run the demo, printing what happens; stop the server it started whatever happens.

    Returns:
        The exit status: 0 on success, 1 when something failed (the reason is printed),
        130 on Ctrl-C.
    """
    missing = [name for name in SERVER_EXTRA if not _importable(name)]
    if missing:
        print(f"The demo runs a server here and needs the server extra ({', '.join(missing)} missing): "
              "pip install '.[server]'")
        return 1
    from transformers.utils import logging as transformers_logging

    from kernel_server.tinymodels import VOCAB_SIZE, build_tiny_text_model

    transformers_logging.disable_progress_bar()  # the demo's bars suffice

    with tempfile.TemporaryDirectory(prefix="mymps-demo-") as tmp:
        server = LocalServer(Path(tmp) / "home", env=SERVER_ENV, log_path=Path(tmp) / "server.log", own_session=True)
        launched = False
        try:
            print("mymps demo: a tiny model, a real server and the client, all on this machine's CPU; "
                  "nothing is downloaded.")
            started = time.perf_counter()
            model_dir = build_tiny_text_model(Path(tmp) / "tiny-gpt2")
            print(f"Built a tiny GPT-2 (2 layers, {VOCAB_SIZE}-token vocabulary, random weights) "
                  f"in {time.perf_counter() - started:.1f} s.")

            started = time.perf_counter()
            launched = True
            server.start()
            with Client(server.host, server.port, token=server.token) as client:
                health = client.health()
                assert server.process is not None  # started
                print(f"Started the server on {server.host}:{server.port} (device {health.get('device')}, "
                      f"pid {server.process.pid}) in {time.perf_counter() - started:.1f} s.")
                _use(client, str(model_dir))
            return 0
        except KeyboardInterrupt:
            print("\nInterrupted.")
            return 130
        except (MympsError, RuntimeError) as exc:  # RuntimeError: torch's, while building the model
            print(f"The demo failed: {exc}")
            tail = server.log_text()[-LOG_TAIL_CHARS:]
            if tail:
                print("The server's log ends with:\n" + tail)
            return 1
        finally:
            if launched:
                server.stop()
                print("Stopped the server.")


def _use(client: Client, model: str) -> None:
    """The client calls the demo shows: load, generate, stream."""
    loaded = client.load_model(model)
    print(f"Loaded it on {loaded['device']} ({loaded['dtype']}) in {loaded['load_time_s']:.2f} s.")

    result = client.generate(model, PROMPT, max_new_tokens=32, temperature=0.8, seed=0)
    print(f"generate: {result['tokens_generated']} tokens in {result['time_s']:.2f} s "
          f"({result['tokens_per_s']:.0f} tokens/s):")
    print(f"  {PROMPT}{_printable(result['text'])}")

    print("stream_generate, piece by piece:")
    print(f"  {PROMPT}", end="", flush=True)
    stream = client.stream_generate(model, PROMPT, max_new_tokens=32, temperature=0.8, seed=1)
    for piece in stream:
        print(_printable(piece), end="", flush=True)
    stats = stream.stats or {}
    print(f"\n  {stats.get('tokens_generated')} tokens, {stats.get('tokens_per_s', 0):.0f} tokens/s, "
          f"stopped by {stats.get('stop_reason')}.")
    print("The tiny model writes nonsense; with `mymps serve` on a machine with a GPU and `mymps tunnel` "
          "here, the same calls run real models.")


def _printable(text: str) -> str:
    """The text with what a terminal cannot show (a random model emits stray bytes) as a dot."""
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "\u00b7" for ch in text)


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
