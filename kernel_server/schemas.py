"""Request bodies, validated before any work is queued; a bad field is a 422 naming it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mymps_magic import wire

Kind = Literal["text", "diffusion", "auto", "torchscript", "checkpoint"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class LoadBody(BaseModel):
    """``kind`` left out, ``null`` or ``"detect"``: found from what the source holds (``detect.py``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(min_length=1)
    kind: Kind | Literal["detect"] | None = "detect"
    dtype: DType = "auto"
    path: str | None = None
    model_class: str | None = None
    trust_remote_code: bool = False


_GENERATE = wire.GenerateRequest


class GenerateBody(BaseModel):
    """``wire.GenerateRequest`` as pydantic sees it, for the 422 that names a bad field and for
    the OpenAPI schema; its defaults and limits are the wire's."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(_GENERATE.max_new_tokens, ge=1, le=wire.MAX_NEW_TOKENS)
    temperature: float = Field(_GENERATE.temperature, ge=0.0, le=wire.MAX_TEMPERATURE)
    top_p: float = Field(_GENERATE.top_p, gt=0.0, le=1.0)
    seed: int | None = Field(_GENERATE.seed, ge=0, lt=wire.MAX_SEED)
    stop: list[str] = Field(default_factory=list, max_length=wire.MAX_STOP_STRINGS)

    def request(self) -> wire.GenerateRequest:
        """The wire's request, read by the wire's reader (so both ends agree on what it holds)."""
        return wire.GenerateRequest.from_json(self.model_dump())


class ImageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)
    prompt: str = ""
    steps: int = Field(20, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    num_images: int = Field(1, ge=1, le=16)


def describe_validation_error(errors: list[dict[str, object]]) -> str:
    """One line out of pydantic's error list: ``field: problem; field: problem``."""
    parts = []
    for err in errors:
        where_in = err.get("loc", ())
        loc = [str(p) for p in (where_in if isinstance(where_in, (list, tuple)) else ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
