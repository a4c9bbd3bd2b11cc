"""The test kit: tiny local models of every kind and the real server as a subprocess.

The text model and the server launcher are the ones `mymps demo` uses
(`kernel_server.tinymodels`, `mymps_magic.cli.localserver`); this kit adds the other kinds and
the tests' environment.

Tests and benchmarks import it (``tests/`` is on their path), so that they run offline, on CPU, in
seconds, against the same artifacts a user would load: every model is written with the library's
own ``save_pretrained`` / ``torch.save`` / ``torch.jit.save`` and read back by the server through
the same ``from_pretrained`` path as a hub model.

Heavy imports (torch, transformers, diffusers) happen inside the builders: importing this module
costs nothing, so client-only tests that need just `ServerProcess` stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mymps_magic.cli.localserver import LocalServer

__all__ = [
    "CHECKPOINT_CLASS",
    "MakeServer",
    "QUIET_ENV",
    "REPO_ROOT",
    "TESTS_DIR",
    "ServerProcess",
    "TinyModels",
    "auth",
    "build_tiny_auto_model",
    "build_tiny_checkpoint",
    "build_tiny_diffusion",
    "build_tiny_models",
    "build_tiny_torchscript",
    "never_ending_copy",
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
    from kernel_server.tinymodels import build_tiny_text_model

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


def never_ending_copy(model: Path, into: Path) -> Path:
    """A copy of a tiny model whose end-of-text id no sample can take, so a generation of N
    tokens gives N tokens (the random tiny model otherwise samples its EOS now and then)."""
    shutil.copytree(model, into)
    for name in ("config.json", "generation_config.json"):
        file = into / name
        if file.exists():
            config = json.loads(file.read_text())
            config["eos_token_id"] = 10**6
            file.write_text(json.dumps(config))
    return into


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


def auth(token: str) -> dict[str, str]:
    """The header that carries ``token``, as every client sends it."""
    return {"Authorization": f"Bearer {token}"}


class ServerProcess(LocalServer):
    """The real server as tests and benchmarks run it: `LocalServer` in the test environment.

    On top of `LocalServer`, the process runs in the repository with `QUIET_ENV` and a
    ``PYTHONPATH`` holding the repository and ``tests/``, where the server finds ``kitmodels``
    (the checkpoints' class) as it would a user's own package.

    Args:
        home: the server's ``--home``; created if missing.
        port: the port to listen on; a free one by default.
        options: more command-line options, as `LocalServer` takes them.
        env: extra environment variables for the process (e.g. ``MYMPS_PRELOAD``).
        token_file: as `LocalServer`: the server makes and uses its token file.
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
        path = [str(REPO_ROOT), str(TESTS_DIR)]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        super().__init__(
            home,
            port=port,
            options=options,
            env={**QUIET_ENV, "PYTHONPATH": os.pathsep.join(path), **(env or {})},
            token_file=token_file,
            cwd=REPO_ROOT,
        )


MakeServer = Callable[..., ServerProcess]
"""The type of conftest's ``make_server`` fixture: keyword options in, a started server out."""


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``predicate`` until it is truthy and return its value; a ``TimeoutError`` names
    ``what`` after ``timeout`` seconds (a bound that tells "hung" from "slow", not a speed limit)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)
    return value
