"""Which kind of model a name or path holds, read from its files before anything is loaded.

A load without a kind used to mean ``text``, so a diffusers folder failed in the tokenizer with a
five-line ``sentencepiece`` error, a ``.pt`` file with a JSON-decoding 404, and a BERT encoder
loaded and then failed in ``generate``. Here the kind comes from what the source holds:

- a folder with ``model_index.json`` is a diffusers pipeline: ``diffusion``;
- a zip whose entries include ``constants.pkl`` or ``code/`` is a TorchScript module:
  ``torchscript`` (``torch.jit.save`` writes both; ``torch.save`` writes neither);
- any other ``torch.save`` file, or a ``.safetensors`` file, is a state dict: ``checkpoint``;
- a ``config.json`` whose architecture is a causal LM (in transformers' causal-LM mapping, or named
  ``...ForCausalLM``/``...LMHeadModel``) is ``text``; any other architecture (``BertModel``,
  ``T5ForConditionalGeneration``) has no causal LM head and is ``auto``.

A hub id is judged by the files huggingface_hub has cached for it; with none cached, nothing is
known and a load without a kind stays ``text``, as it always was. Only a few small files are read
(JSON, a zip's directory), so detection costs milliseconds.

An explicit kind is checked against the same evidence: ``auto`` fits a causal LM too (its bare
``AutoModel`` gives hidden states), every other mismatch is refused in one line naming the kind
that fits.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mymps_magic.wire import DETECT

from .errors import BadRequest, NotFound

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class Detected:
    """What a source holds: the kind that loads it and the evidence, as a user would say it."""

    kind: str
    holds: str


def looks_local(source: str) -> bool:
    """A path on the server (written as one, or existing) rather than a hub id."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def detect(source: str) -> Detected | None:
    """The kind ``source`` holds, or ``None`` when its files do not say.

    Raises:
        NotFound: ``source`` is neither a path on the server nor a valid hub id.
    """
    if looks_local(source):
        path = Path(source).expanduser()
        if path.is_dir():
            return _detect_folder(path)
        return _detect_file(path) if path.is_file() else None
    return _detect_cached(source)


def resolve_kind(kind: str, source: str, label: str) -> str:
    """The kind to load ``source`` as: ``kind`` itself, or the detected one for ``detect``.

    Args:
        kind: what the caller asked for, or ``detect``.
        source: the hub id or path to load.
        label: how the message names the model: its name in backticks, and its path if given.

    Raises:
        BadRequest: ``kind`` does not fit what ``source`` holds; the message names the one that
            does. Also a local file that holds nothing recognisable and no kind was given.
        NotFound: ``source`` is neither a path on the server nor a valid hub id.
    """
    found = detect(source)
    if kind == DETECT:
        if found is not None:
            return found.kind
        if Path(source).expanduser().is_file():
            raise BadRequest(f"cannot tell what {label} holds (not a TorchScript module, state dict "
                             "or safetensors file); give its kind: torchscript or checkpoint")
        return "text"
    if found is None or found.kind == kind or (kind == "auto" and found.kind == "text"):
        return kind
    extra = " and model_class='package.module:ClassName'" if found.kind == "checkpoint" else ""
    raise BadRequest(f"{label} holds {found.holds}, not a {kind} model; load it with kind='{found.kind}'{extra}")


def _detect_folder(path: Path) -> Detected | None:
    if (path / "model_index.json").is_file():
        return Detected("diffusion", "a diffusers pipeline (model_index.json)")
    if (path / "config.json").is_file():
        return _from_config(path / "config.json")
    return None


def _detect_file(path: Path) -> Detected | None:
    if path.suffix == ".safetensors":
        return Detected("checkpoint", "a safetensors state dict")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return Detected("torchscript", "a TorchScript module (constants.pkl and code/ in the zip)")
        if any(n.endswith("/data.pkl") for n in names):
            return Detected("checkpoint", "a torch.save state dict (data.pkl in the zip, no TorchScript code)")
        return None
    if path.suffix in _STATE_DICT_SUFFIXES:
        return Detected("checkpoint", "a torch.save state dict")
    return None


def _detect_cached(repo_id: str) -> Detected | None:
    """Judge a hub id by the files huggingface_hub has cached for it (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json")
        config = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise NotFound(f"{repo_id!r} is neither a path on the server nor a valid hub id; "
                       "give a hub id like 'org/name' or a path that exists on the server") from None
    if isinstance(index, str):
        return Detected("diffusion", "a diffusers pipeline (model_index.json)")
    return _from_config(Path(config)) if isinstance(config, str) else None


def _from_config(config_file: Path) -> Detected | None:
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "_class_name" in config:  # a single diffusers component
        return None
    architectures = [str(a) for a in config.get("architectures") or []]
    causal = _causal_architectures()
    for arch in architectures:
        if arch in causal or arch.endswith(_CAUSAL_SUFFIXES):
            return Detected("text", f"a causal language model ({arch})")
    if architectures:
        return Detected("auto", f"a {architectures[0]}, which has no causal language-model head")
    return None  # a config written by hand names no architecture: nothing to go on


def _causal_architectures() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names

