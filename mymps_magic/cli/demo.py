"""`mymps demo`: the whole path on one machine, with no hub access and no Mac.

It builds a tiny text model locally, starts a real server subprocess on a free loopback port,
and drives it through the `Client`: load (with a progress bar), generate, stream. The tiny model
builder also serves the tests, so that the demo and the test suite exercise the same model.

Everything heavy (torch, transformers, tokenizers) is imported inside functions: importing this
module stays as light as the rest of the client.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from mymps_magic.client import Client
from mymps_magic.errors import ConnectionError, MympsError

# A few paragraphs of plain English: enough for a byte-level BPE to learn real merges, so the
# tiny model's tokens decode to word pieces rather than single bytes.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs
through the field and into the forest. A small bird sings on the branch of an old tree.

Machine learning models learn patterns from data. A language model reads text one token at a
time and predicts the next token. When the model is small, its answers are short and strange,
but the words still come from the text it was trained on.

The server keeps models in memory so that every notebook cell can use them without loading
them again. The client sends a prompt, the server generates new tokens, and the tokens stream
back to the notebook as they are made. Loading a model takes time; generating a token is fast.

Once upon a time there was a little house by the river. In the house lived an old man and his
cat. Every morning the man made tea, and every evening the cat sat by the window and watched
the boats go by. The river was wide and the water was cold and clear.
"""

SPECIAL_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 500

Arch = Literal["gpt2", "llama"]


def build_tiny_text_model(directory: str | Path, arch: Arch = "gpt2") -> Path:
    """Build and save a tiny causal language model with its tokenizer, offline, in about a second.

    The tokenizer is a byte-level BPE trained in memory on a built-in English corpus (vocabulary
    of about 500), so any prompt tokenizes and every generated token decodes to text. The model
    has random weights (seeded, so runs repeat) and two layers: it writes nonsense, but real
    nonsense, through the same `AutoModelForCausalLM` / `AutoTokenizer` path as a hub model.

    Args:
        directory: where to save; created if missing. Load it with ``load_model(str(path))``.
        arch: ``"gpt2"`` or ``"llama"``, the two common decoder families.

    Returns:
        The directory, as a `Path`.

    Raises:
        ValueError: ``arch`` is not one of the two.
        ImportError: the server extra (torch, transformers, tokenizers) is not installed.
    """
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=256,
    )
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    assert isinstance(special, int)
    vocab = len(tokenizer)

    torch.manual_seed(0)
    model: PreTrainedModel
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=vocab,
                bos_token_id=special, eos_token_id=special, pad_token_id=special,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab,
                bos_token_id=special, eos_token_id=special, pad_token_id=special,
            )
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SERVER_EXTRA = ("torch", "transformers", "tokenizers", "fastapi", "uvicorn")
PROMPT = "Once upon a time"
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


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

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # the demo's bars suffice

    with tempfile.TemporaryDirectory(prefix="mymps-demo-") as tmp:
        server: subprocess.Popen[bytes] | None = None
        log_path = Path(tmp) / "server.log"
        try:
            print("mymps demo: a tiny model, a real server and the client, all on this machine's CPU; "
                  "nothing is downloaded.")
            started = time.perf_counter()
            model_dir = build_tiny_text_model(Path(tmp) / "tiny-gpt2")
            print(f"Built a tiny GPT-2 (2 layers, {VOCAB_SIZE}-token vocabulary, random weights) "
                  f"in {time.perf_counter() - started:.1f} s.")

            token = secrets.token_hex(32)  # as the server makes them: never a leading '-'
            port = _free_port()
            started = time.perf_counter()
            with open(log_path, "wb") as log:
                server = subprocess.Popen(
                    [sys.executable, "-m", "kernel_server", "--port", str(port), "--home", str(Path(tmp) / "home"),
                     "--device", "cpu"],
                    env=_server_env(token),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: Ctrl-C interrupts the demo, which then stops the server
                    # in order, instead of killing the server under a running request.
                    start_new_session=True,
                )
            with Client("127.0.0.1", port, token=token) as client:
                health = _wait_until_up(client, server)
                print(f"Started the server on 127.0.0.1:{port} (device {health.get('device')}, "
                      f"pid {server.pid}) in {time.perf_counter() - started:.1f} s.")
                _use(client, str(model_dir))
            return 0
        except KeyboardInterrupt:
            print("\nInterrupted.")
            return 130
        except (MympsError, RuntimeError) as exc:
            print(f"The demo failed: {exc}")
            if log_path.exists() and log_path.stat().st_size:
                tail = log_path.read_text(errors="replace")[-2000:]
                print("The server's log ends with:\n" + tail)
            return 1
        finally:
            if server is not None:
                _stop(server)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(token: str) -> dict[str, str]:
    """The demo server's environment: the user's, minus their mymps settings, offline."""
    # The user's own MYMPS_* settings (preloads, a token file, a home) belong to their real
    # server; the demo's server must not pick them up.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
    env.update(MYMPS_TOKEN=token, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _wait_until_up(client: Client, server: subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was up")
        try:
            return client.health()
        except ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not up after {_START_TIMEOUT_S:.0f} s") from None
            time.sleep(0.1)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
