"""Request bodies, validated before any work is queued; a bad field is a 422 naming it.

Each is the wire's request type as pydantic sees it, for the 422 and for the OpenAPI schema:
its defaults and limits are the wire's, and ``request()`` hands the endpoint the wire's type,
read by the wire's reader (so both ends agree on what a body holds).

The original's endpoints (load and generate) take fields they do not know, as the original did,
and ``ignored()`` names them for the answer's ``ignored`` list; ``/image`` refuses them (422).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mymps_magic import wire
from mymps_magic.wire.keepalive import parse_keep_alive

_LOAD = wire.LoadRequest
_GENERATE = wire.GenerateRequest
_IMAGE = wire.ImageRequest


def _keep_alive(value: Any) -> float | None:
    """The seconds of a ``keep_alive`` in any of its spellings; the wire's message when none."""
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except wire.WireFormatError as exc:
        raise ValueError(str(exc)) from None


KeepAlive = Annotated[float | str | None, BeforeValidator(_keep_alive),
                      Field(description="seconds, -1 forever, 0 unload when idle, or a duration like 30s, 5m, 1h")]


class _Lenient(BaseModel):
    """A body of one of the original's endpoints: unknown fields are kept aside, not refused."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def ignored(self) -> list[str]:
        """The fields the request sent that this endpoint does not know, sorted."""
        return sorted(self.model_extra or {})

    def known(self) -> dict[str, Any]:
        """The body without the ignored fields."""
        return self.model_dump(exclude=set(self.model_extra or {}))


class LoadBody(_Lenient):
    """``wire.LoadRequest``; ``kind`` left out, ``null`` or ``"detect"``: found from what the
    source holds (``detect.py``); ``dtype`` in any of ``wire.DTYPE_SPELLINGS``."""

    name: str = Field(min_length=1)
    kind: wire.Kind | Literal["detect"] | None = wire.DETECT
    dtype: wire.DTypeSpelling = wire.DEFAULT_DTYPE
    path: str | None = _LOAD.path
    model_class: str | None = _LOAD.model_class
    trust_remote_code: bool = _LOAD.trust_remote_code
    keep_alive: KeepAlive = None

    def request(self) -> wire.LoadRequest:
        return wire.LoadRequest.from_json(self.known())


class GenerateBody(_Lenient):
    """``wire.GenerateRequest``; a sampling field left out or ``null`` is the model's own
    (its ``generation_config``)."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(_GENERATE.max_new_tokens, ge=1, le=wire.MAX_NEW_TOKENS)
    temperature: float | None = Field(_GENERATE.temperature, ge=0.0, le=wire.MAX_TEMPERATURE)
    top_p: float | None = Field(_GENERATE.top_p, gt=0.0, le=1.0)
    top_k: int | None = Field(_GENERATE.top_k, ge=0)
    repetition_penalty: float | None = Field(_GENERATE.repetition_penalty, ge=wire.MIN_REPETITION_PENALTY,
                                             le=wire.MAX_REPETITION_PENALTY)
    seed: int | None = Field(_GENERATE.seed, ge=0, lt=wire.MAX_SEED)
    stop: list[str] = Field(default_factory=list, max_length=wire.MAX_STOP_STRINGS)
    keep_alive: KeepAlive = None

    def request(self) -> wire.GenerateRequest:
        return wire.GenerateRequest.from_json(self.known())


class ImageBody(BaseModel):
    """``wire.ImageRequest``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)
    prompt: str = _IMAGE.prompt
    steps: int = Field(_IMAGE.steps, ge=1, le=wire.MAX_STEPS)
    seed: int | None = Field(_IMAGE.seed, ge=0, lt=wire.MAX_SEED)
    guidance_scale: float | None = Field(_IMAGE.guidance_scale, ge=0.0, le=wire.MAX_GUIDANCE_SCALE)
    width: int | None = Field(_IMAGE.width, ge=wire.MIN_IMAGE_SIDE, le=wire.MAX_IMAGE_SIDE,
                              multiple_of=wire.IMAGE_SIDE_STEP)
    height: int | None = Field(_IMAGE.height, ge=wire.MIN_IMAGE_SIDE, le=wire.MAX_IMAGE_SIDE,
                               multiple_of=wire.IMAGE_SIDE_STEP)
    num_images: int = Field(_IMAGE.num_images, ge=1, le=wire.MAX_IMAGES)

    def request(self) -> wire.ImageRequest:
        return wire.ImageRequest.from_json(self.model_dump())


def describe_validation_error(errors: list[dict[str, object]]) -> str:
    """One line out of pydantic's error list: ``field: problem; field: problem``."""
    parts = []
    for err in errors:
        where_in = err.get("loc", ())
        loc = [str(p) for p in (where_in if isinstance(where_in, (list, tuple)) else ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
