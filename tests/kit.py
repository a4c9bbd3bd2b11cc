"""The test kit: tiny local models of every kind and the real server as a subprocess.

Tests and benchmarks import it (``tests/`` is on their path), so that they run offline, on CPU, in
seconds, against the same artifacts a user would load: every model is written with the library's
own ``save_pretrained`` / ``torch.save`` / ``torch.jit.save`` and read back by the server through
the same ``from_pretrained`` path as a hub model.

Heavy imports (torch, transformers, diffusers) happen inside the builders: importing this module
costs nothing, so client-only tests that need just `ServerProcess` stay fast.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Callable, Iterator, Mapping

from mymps_magic.cli.demo import build_tiny_text_model

__all__ = [
    "CHECKPOINT_CLASS",
    "MakeServer",
    "QUIET_ENV",
    "REPO_ROOT",
    "TESTS_DIR",
    "ServerProcess",
    "ServerStartError",
    "TinyModels",
    "build_tiny_auto_model",
    "build_tiny_checkpoint",
    "build_tiny_diffusion",
    "build_tiny_models",
    "build_tiny_torchscript",
    "free_port",
]

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

CHECKPOINT_CLASS = "kitmodels:TinyNet"
"""The ``model_class`` of the checkpoint artifacts; `ServerProcess` puts ``tests/`` on the path."""

QUIET_ENV: Mapping[str, str] = {
    # Nothing may reach the hub: a test that tries must fail at once, not hang on the network.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # tokenizers warns (and may deadlock) when a process forks after using its thread pool.
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment for the test process and every server it starts: offline and quiet."""

_SEED = 0
_HEALTH_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class TinyModels:
    """Where `build_tiny_models` put each artifact; every path loads with ``kind`` as named.

    Attributes:
        root: the directory holding them all.
        text_gpt2: ``kind="text"``, a GPT-2 causal LM with its tokenizer in the same directory.
        text_llama: ``kind="text"``, a Llama causal LM with its tokenizer.
        diffusion: ``kind="diffusion"``, an unconditional `DDPMPipeline` (it takes no prompt).
        torchscript: ``kind="torchscript"``, float32 ``(N, 4)`` in, ``(N, 3)`` out.
        checkpoint: ``kind="checkpoint"``, a ``torch.save`` state dict of `checkpoint_class`.
        checkpoint_safetensors: the same weights as ``.safetensors``.
        auto: ``kind="auto"``, a two-layer `BertModel` with its tokenizer (hidden size 32).
        checkpoint_class: the ``model_class`` for both checkpoints: float32 ``(N, 4)`` -> ``(N, 2)``.
    """

    root: Path
    text_gpt2: Path
    text_llama: Path
    diffusion: Path
    torchscript: Path
    checkpoint: Path
    checkpoint_safetensors: Path
    auto: Path
    checkpoint_class: str = CHECKPOINT_CLASS


def build_tiny_models(root: str | Path) -> TinyModels:
    """Build every tiny model into ``root``, offline, in a few seconds (most of it importing torch).

    Args:
        root: the directory to fill; created if missing.

    Returns:
        The paths, as a `TinyModels`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint, checkpoint_safetensors = build_tiny_checkpoint(root / "checkpoint")
    return TinyModels(
        root=root,
        text_gpt2=build_tiny_text_model(root / "text-gpt2", arch="gpt2"),
        text_llama=build_tiny_text_model(root / "text-llama", arch="llama"),
        diffusion=build_tiny_diffusion(root / "diffusion"),
        torchscript=build_tiny_torchscript(root / "torchscript" / "tiny.pt"),
        checkpoint=checkpoint,
        checkpoint_safetensors=checkpoint_safetensors,
        auto=build_tiny_auto_model(root / "auto-bert"),
    )


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for repeatable weights without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def build_tiny_diffusion(directory: str | Path) -> Path:
    """Save a tiny unconditional `DDPMPipeline` (8x8 RGB, 50 train timesteps).

    A 2-step run takes milliseconds on CPU. The pipeline has no text encoder, so it is called
    without a prompt: ``pipe(batch_size=1, num_inference_steps=2, output_type="pil")``.

    Args:
        directory: where to save; created if missing.

    Returns:
        The directory, loadable with ``diffusers.DiffusionPipeline.from_pretrained``.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    directory = Path(directory)
    with _seeded():
        unet = UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(directory)
    return directory


def build_tiny_torchscript(path: str | Path) -> Path:
    """Save a scripted ``Linear(4, 3)``: float32 ``(N, 4)`` in, ``(N, 3)`` out.

    Args:
        path: the ``.pt`` file to write; its directory is created if missing.

    Returns:
        ``path``, loadable with ``torch.jit.load`` and no Python class.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _seeded(), warnings.catch_warnings():
        # torch 2.9+ deprecates TorchScript, but users still bring .pt files: the kind stays.
        warnings.filterwarnings("ignore", message="`torch.jit", category=DeprecationWarning)
        module = torch.jit.script(torch.nn.Linear(4, 3))
        torch.jit.save(module, str(path))
    return path


def build_tiny_checkpoint(directory: str | Path) -> tuple[Path, Path]:
    """Save the state dict of `kitmodels.TinyNet` twice: ``tinynet.pt`` and ``tinynet.safetensors``.

    Args:
        directory: where to save; created if missing.

    Returns:
        ``(torch.save file, safetensors file)``; both load into ``kitmodels.TinyNet()``.
    """
    import torch
    from safetensors.torch import save_file

    from kitmodels import TinyNet

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _seeded():
        state = TinyNet().state_dict()
    pt, st = directory / "tinynet.pt", directory / "tinynet.safetensors"
    torch.save(state, pt)
    save_file(state, str(st))
    return pt, st


_BERT_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
    + ["the", "a", "mac", "gpu", "model", "hello", "world", "notebook", "server", "token"]
)


def build_tiny_auto_model(directory: str | Path) -> Path:
    """Save a two-layer `BertModel` (hidden size 32) and a WordPiece tokenizer for ``kind="auto"``.

    An encoder, unlike the text models: its forward takes ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` and returns ``last_hidden_state`` and ``pooler_output``, so ``/infer``
    is exercised with several named inputs and outputs. The tokenizer is built from a
    `tokenizers.Tokenizer` object, which works the same across transformers 4 and 5.

    Args:
        directory: where to save; created if missing.

    Returns:
        The directory, loadable with ``AutoModel`` and ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    vocab = {token: index for index, token in enumerate(_BERT_VOCAB)}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with _seeded():
        model = BertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    """The server did not answer ``GET /health``; the message ends with its log tail.

    Attributes:
        returncode: the exit status if the process ended, else ``None`` (it was still starting).
        log: the whole log of the process.
    """

    def __init__(self, message: str, returncode: int | None, log: str) -> None:
        super().__init__(f"{message}\n--- server log (tail) ---\n{log[-_LOG_TAIL_CHARS:]}")
        self.returncode = returncode
        self.log = log


def auth(token: str) -> dict[str, str]:
    """The header that carries ``token``, as every client sends it."""
    return {"Authorization": f"Bearer {token}"}


class ServerProcess:
    """The real ``python -m kernel_server`` on a loopback port, as tests and benchmarks use it.

    The process gets a random ``MYMPS_TOKEN``, ``--device cpu``, its own ``--home``, the quiet
    offline environment and a ``PYTHONPATH`` with the repository and ``tests/`` (for
    ``kitmodels``). Inherited ``MYMPS_*`` variables are dropped so the developer's own settings
    never leak into a test. Its stdout and stderr go to ``HOME/server-process.log``, appended
    across restarts, so a test can read what it printed.

    `start` may be called again after `stop` (same home, port and token): that is how tests of
    ``--restore`` restart a server.

    Args:
        home: the server's ``--home``; created if missing.
        port: the port to listen on; a free one by default.
        options: more command-line options, ``max_body="1KiB"`` -> ``--max-body 1KiB``;
            ``True`` gives a bare flag, ``False``/``None`` omits it, a list or tuple repeats it.
        env: extra environment variables for the process (e.g. ``MYMPS_PRELOAD``).
        token_file: when true, no ``MYMPS_TOKEN`` is given: the server uses its token file
            (created on first start) and `token` is read from ``HOME/token`` once it is up.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        port: int | None = None,
        options: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        token_file: bool = False,
    ) -> None:
        self.home = Path(home)
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.options = dict(options or {})
        self.extra_env = dict(env or {})
        self.token_file = token_file
        self.token = "" if token_file else secrets.token_hex(24)  # as the server makes them: never a leading "-"
        self.log_path = self.home / "server-process.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def ws_url(self, path: str = "/ws/generate") -> str:
        """The ``ws://`` address of one of its WebSocket endpoints."""
        return f"ws://{self.host}:{self.port}{path}"

    @property
    def command(self) -> list[str]:
        """The command line that `start` runs."""
        args = [sys.executable, "-m", "kernel_server", "--host", self.host, "--port", str(self.port)]
        args += ["--home", str(self.home), "--device", "cpu"]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    args += [flag, str(item)]
            elif value is not None and value is not False:
                args += [flag, str(value)]
        return args

    def environment(self) -> dict[str, str]:
        """The process environment: ours minus ``MYMPS_*``, plus the kit's settings."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("MYMPS_")}
        env.update(QUIET_ENV)
        path = [str(REPO_ROOT), str(TESTS_DIR)]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        if not self.token_file:
            env["MYMPS_TOKEN"] = self.token
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = _HEALTH_TIMEOUT_S) -> ServerProcess:
        """Start the process and wait until ``GET /health`` answers 200.

        Returns:
            ``self``, for ``server = ServerProcess(home).start()``.

        Raises:
            ServerStartError: the process exited, or did not answer within ``timeout`` seconds
                (it is then stopped); the message carries the log tail.
        """
        if self.process is not None:
            raise RuntimeError(f"the server on port {self.port} is already started")
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            returncode = self.process.poll()
            if returncode is not None:
                self._close()
                raise ServerStartError(f"the server exited with status {returncode}", returncode, self.log_text())
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"no answer from {self.url}/health in {timeout:g} s", None, self.log_text())
            time.sleep(0.05)
        if self.token_file:
            self.token = (self.home / "token").read_text().strip()
        return self

    def _healthy(self) -> bool:
        # No proxy handler: a proxy from the environment must never see loopback test traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/health", timeout=1.0) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int | None:
        """Stop the process: SIGTERM, then SIGKILL after 10 s. Safe to call twice.

        Returns:
            The exit status, or ``None`` if it was not running.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self._close()

    def _close(self) -> int | None:
        assert self.process is not None
        returncode = self.process.returncode
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return returncode

    @property
    def running(self) -> bool:
        """Whether the process is started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the process has printed so far (all starts), or ``""``."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ServerProcess {self.url} home={str(self.home)!r} {state}>"


MakeServer = Callable[..., ServerProcess]
"""The type of conftest's ``make_server`` fixture: keyword options in, a started server out."""
