"""The JSON bodies the client sends: ``POST /models/load`` (:class:`LoadRequest`), ``POST
/generate`` and the first message of ``/ws/generate`` (:class:`GenerateRequest`), ``POST /image``
(:class:`ImageRequest`).

Each is a frozen dataclass and the one place for its fields, defaults and limits: the client
builds its body with ``to_json()``, the server's pydantic models (``kernel_server/schemas.py``)
take their defaults and limits from here, so that the OpenAPI schema shows them and a bad field
is a 422 naming it, and then read the body with the validating ``from_json()``.

The original mymps's endpoints (``/models/load``, ``/generate``, ``/ws/generate``) ignored fields
they did not know; so do their readers here, and :func:`ignored_fields` names them, so that the
answer can list them (``ignored``) and a misspelt field is seen rather than silently dropped.
``/image`` is ours and stays strict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from .errors import WireFormatError
from .keepalive import KeepAlive, parse_keep_alive

Kind = Literal["text", "diffusion", "auto", "torchscript", "checkpoint"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
DTypeSpelling = Literal["auto", "float32", "float16", "bfloat16", "half", "float", "fp16", "fp32", "bf16"]
"""What a load request may say for its dtype: the canonical names (:data:`DType`) and torch's and
the usual short spellings, which :func:`canonical_dtype` turns into the canonical ones."""
KINDS: tuple[str, ...] = get_args(Kind)
DTYPES: tuple[str, ...] = get_args(DType)
DTYPE_SPELLINGS: Final[Mapping[str, str]] = {
    **{name: name for name in DTYPES},
    "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16",
}
"""Each accepted dtype spelling and the canonical name it means (the original took torch's)."""
DETECT: Final = "detect"
"""The kind that asks the server to find the kind from what the source holds."""
DEFAULT_DTYPE: Final = "auto"

MAX_NEW_TOKENS = 8192
MAX_TEMPERATURE = 10.0
GREEDY_BELOW = 1e-3
"""A temperature under this decodes greedily: dividing the logits by a smaller one overflows them
(1e-300 gave NaN probabilities, a 500), and sampling that cold picks the likeliest token anyway."""
MIN_REPETITION_PENALTY = 0.01
"""The smallest penalty taken: dividing by a far smaller one (1e-78) overflowed the logits."""
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63
MAX_STEPS = 1000
MAX_GUIDANCE_SCALE = 100.0
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 4096
IMAGE_SIDE_STEP = 8
MAX_IMAGES = 16


@dataclass(frozen=True)
class LoadRequest:
    """A model to load, as the client sends it and the server loads (and keeps for ``--restore``).

    Args:
        name: a hub id or a path on the server; the name later calls use.
        kind: one of :data:`KINDS`, or :data:`DETECT` to find it from what the source holds.
        dtype: one of :data:`DTYPES` (``auto``: float16 on mps/cuda, float32 on cpu); the reader
            also takes the other spellings of :data:`DTYPE_SPELLINGS` (``half``, ``fp16``...).
        path: where to read the model from, when not from ``name``.
        model_class: the class to load a ``checkpoint`` into.
        trust_remote_code: let transformers run the model's own code.
        keep_alive: how long it stays loaded once idle (``wire.keepalive``: seconds, -1 forever,
            0 unload when idle, or ``"5m"``); None: the server's ``--keep-alive``. The reader
            makes it seconds.
    """

    name: str
    kind: str = DETECT
    dtype: str = DEFAULT_DTYPE
    path: str | None = None
    model_class: str | None = None
    trust_remote_code: bool = False
    keep_alive: KeepAlive | None = None

    @property
    def source(self) -> str:
        """Where the model is read from."""
        return self.path or self.name

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent; ``path`` and ``model_class`` only where given."""
        body: dict[str, Any] = {"name": self.name, "kind": self.kind, "dtype": self.dtype,
                                "trust_remote_code": self.trust_remote_code}
        if self.path is not None:
            body["path"] = self.path
        if self.model_class is not None:
            body["model_class"] = self.model_class
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    @classmethod
    def from_json(cls, body: Any) -> LoadRequest:
        """Read and check a request written by :meth:`to_json` (``kind`` null means detect; the
        dtype becomes its canonical name; unknown fields are skipped: :func:`ignored_fields`).

        Raises:
            WireFormatError: a field is missing, of the wrong type or not a known name.
        """
        fields = _fields(cls, body, "a load request must be a JSON object {name, kind, dtype, ...}", strict=False)
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            raise WireFormatError("a load request needs 'name' as a non-empty string")
        kind = fields.get("kind", DETECT)
        kind = DETECT if kind is None else kind
        dtype = canonical_dtype(fields.get("dtype", cls.dtype))
        if kind not in (*KINDS, DETECT):
            raise WireFormatError(f"kind must be one of {', '.join(KINDS)} or {DETECT}, not {kind!r}")
        path, model_class = fields.get("path"), fields.get("model_class")
        if not _optional(path, str) or not _optional(model_class, str):
            raise WireFormatError("path and model_class must be strings or null")
        trust = fields.get("trust_remote_code", cls.trust_remote_code)
        if not isinstance(trust, bool):
            raise WireFormatError(f"trust_remote_code must be true or false, not {trust!r}")
        return cls(name, kind, dtype, path, model_class, trust, _keep_alive(fields))


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, as the client sends it and the server runs it.

    The sampling fields left at None are the model's own: its ``generation_config`` decides, as
    ``model.generate`` would (transformers' defaults where it says nothing: greedy unless it says
    ``do_sample``, then ``temperature`` 1, ``top_k`` 50, ``top_p`` 1). A temperature given here
    decides between greedy (0) and sampling, whatever the model's ``do_sample`` says.

    Args:
        model: the name of a loaded text model.
        prompt: the text to continue (not empty).
        max_new_tokens: at most this many new tokens (1 to :data:`MAX_NEW_TOKENS`).
        temperature: 0 for greedy decoding (as is any under :data:`GREEDY_BELOW`), up to
            :data:`MAX_TEMPERATURE`; None: the model's.
        top_p: nucleus sampling mass, above 0 and at most 1; None: the model's.
        seed: makes sampling repeatable (0 to 2**63-1), or None.
        stop: strings that end the generation (at most :data:`MAX_STOP_STRINGS`).
        top_k: sample among the k likeliest tokens only (0: no limit); None: the model's.
        repetition_penalty: :data:`MIN_REPETITION_PENALTY` to :data:`MAX_REPETITION_PENALTY`; tokens already in the
            prompt or the output are made less likely by this factor (1: off); None: the model's.
        keep_alive: how long the model stays loaded once this request ends (as
            :class:`LoadRequest`'s); None: as long as it would have.
    """

    model: str
    prompt: str
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int | None = None
    repetition_penalty: float | None = None
    keep_alive: KeepAlive | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent; the optional fields only where given."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens}
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "repetition_penalty": self.repetition_penalty, "seed": self.seed, "keep_alive": self.keep_alive}
        body.update({key: value for key, value in optional.items() if value is not None})
        if self.stop:
            body["stop"] = list(self.stop)
        return body

    @classmethod
    def from_json(cls, body: Any) -> GenerateRequest:
        """Read and check a request written by :meth:`to_json` (left-out fields take the defaults;
        unknown fields are skipped: :func:`ignored_fields`).

        Raises:
            WireFormatError: a field is missing, of the wrong type or out of its range.
        """
        fields = _fields(cls, body, "a generate request must be a JSON object {model, prompt, max_new_tokens, ...}",
                         strict=False)
        model, prompt = fields.get("model"), fields.get("prompt")
        if not isinstance(model, str) or not model or not isinstance(prompt, str) or not prompt:
            raise WireFormatError("a generate request needs 'model' and 'prompt' as non-empty strings")
        tokens = fields.get("max_new_tokens", cls.max_new_tokens)
        temperature, top_p = fields.get("temperature"), fields.get("top_p")
        top_k, penalty = fields.get("top_k"), fields.get("repetition_penalty")
        seed = fields.get("seed")
        stop = fields.get("stop") or []
        if not _is_int(tokens) or not 1 <= tokens <= MAX_NEW_TOKENS:
            raise WireFormatError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, not {tokens!r}")
        if temperature is not None and (not _is_number(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE):
            raise WireFormatError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g} or null, "
                                  f"not {temperature!r}")
        if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
            raise WireFormatError(f"top_p must be a number above 0 and at most 1, or null, not {top_p!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            raise WireFormatError(f"top_k must be an integer from 0 (no limit) up, or null, not {top_k!r}")
        if penalty is not None and (not _is_number(penalty)
                                    or not MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY):
            raise WireFormatError(f"repetition_penalty must be a number from {MIN_REPETITION_PENALTY:g} to "
                                  f"{MAX_REPETITION_PENALTY:g} (1: off), or null, not {penalty!r}")
        _check_seed(seed)
        if (not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) for s in stop)):
            raise WireFormatError(f"stop must be a list of at most {MAX_STOP_STRINGS} strings, not {stop!r}")
        if temperature is not None and temperature < GREEDY_BELOW:
            temperature = 0.0
        return cls(model, prompt, int(tokens), _float_or_none(temperature), _float_or_none(top_p), seed,
                   tuple(stop), top_k, _float_or_none(penalty), _keep_alive(fields))


@dataclass(frozen=True)
class ImageRequest:
    """Images from a loaded diffusion pipeline, as the client asks for them.

    Args:
        model: the name of a loaded diffusion model.
        prompt: what to draw (unconditional pipelines ignore it).
        steps: denoising steps (1 to :data:`MAX_STEPS`).
        seed: makes the images repeatable (0 to 2**63-1), or None for a random one.
        guidance_scale: 0 to :data:`MAX_GUIDANCE_SCALE`, or None for the pipeline's default.
        width, height: multiples of 8 from 8 to :data:`MAX_IMAGE_SIDE`, or None for the
            pipeline's default.
        num_images: how many images (1 to :data:`MAX_IMAGES`).
    """

    model: str
    prompt: str = ""
    steps: int = 20
    seed: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent; the optional fields only where given."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "steps": self.steps,
                                "num_images": self.num_images}
        optional = {"seed": self.seed, "guidance_scale": self.guidance_scale, "width": self.width,
                    "height": self.height}
        body.update({key: value for key, value in optional.items() if value is not None})
        return body

    @classmethod
    def from_json(cls, body: Any) -> ImageRequest:
        """Read and check a request written by :meth:`to_json` (left-out fields take the defaults).

        Raises:
            WireFormatError: a field is missing, unknown, of the wrong type or out of its range.
        """
        fields = _fields(cls, body, "an image request must be a JSON object {model, prompt, steps, ...}")
        model, prompt = fields.get("model"), fields.get("prompt", cls.prompt)
        if not isinstance(model, str) or not model or not isinstance(prompt, str):
            raise WireFormatError("an image request needs 'model' as a non-empty string and 'prompt' as a string")
        steps = fields.get("steps", cls.steps)
        if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
            raise WireFormatError(f"steps must be an integer from 1 to {MAX_STEPS}, not {steps!r}")
        seed = fields.get("seed")
        _check_seed(seed)
        scale = fields.get("guidance_scale")
        if scale is not None and (not _is_number(scale) or not 0.0 <= scale <= MAX_GUIDANCE_SCALE):
            raise WireFormatError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE_SCALE:g} or null, "
                                  f"not {scale!r}")
        width, height = fields.get("width"), fields.get("height")
        for side, value in (("width", width), ("height", height)):
            if value is not None and (not _is_int(value) or not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE
                                      or value % IMAGE_SIDE_STEP):
                raise WireFormatError(f"{side} must be a multiple of {IMAGE_SIDE_STEP} from {MIN_IMAGE_SIDE} "
                                      f"to {MAX_IMAGE_SIDE} or null, not {value!r}")
        count = fields.get("num_images", cls.num_images)
        if not _is_int(count) or not 1 <= count <= MAX_IMAGES:
            raise WireFormatError(f"num_images must be an integer from 1 to {MAX_IMAGES}, not {count!r}")
        return cls(model, prompt, steps, seed, None if scale is None else float(scale), width, height, count)


def canonical_dtype(spelling: Any) -> str:
    """The canonical name (one of :data:`DTYPES`) of a dtype spelling of :data:`DTYPE_SPELLINGS`.

    Raises:
        WireFormatError: not a known spelling; the message lists them.
    """
    if not isinstance(spelling, str) or spelling not in DTYPE_SPELLINGS:
        raise WireFormatError(f"dtype must be one of {', '.join(DTYPE_SPELLINGS)}, not {spelling!r}")
    return DTYPE_SPELLINGS[spelling]


def ignored_fields(cls: type, body: Mapping[str, Any]) -> list[str]:
    """The fields of ``body`` that ``cls`` (a request type) does not know, sorted: what a lenient
    reader skipped, for the answer's ``ignored`` list."""
    return sorted(set(body) - set(cls.__dataclass_fields__))  # type: ignore[attr-defined]


def _fields(cls: type, body: Any, shape: str, *, strict: bool = True) -> Mapping[str, Any]:
    """``body`` as a mapping of ``cls``'s fields (``shape`` says what it should look like); an
    unknown field is an error when ``strict``, else skipped by the caller's reads."""
    if not isinstance(body, Mapping):
        raise WireFormatError(shape)
    unknown = ignored_fields(cls, body)
    if strict and unknown:
        known = cls.__dataclass_fields__  # type: ignore[attr-defined]
        raise WireFormatError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return body


def _keep_alive(fields: Mapping[str, Any]) -> float | None:
    value = fields.get("keep_alive")
    return None if value is None else parse_keep_alive(value)


def _check_seed(seed: Any) -> None:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise WireFormatError(f"seed must be an integer from 0 to 2**63-1 or null, not {seed!r}")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional(value: Any, kind: type) -> bool:
    return value is None or isinstance(value, kind)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
