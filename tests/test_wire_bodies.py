"""The wire's REST bodies and /ws/generate messages: what one end writes, the other reads back,
and the server's pydantic bodies agree with the wire's readers on defaults and limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kernel_server.schemas import GenerateBody, ImageBody, LoadBody
from mymps_magic import wire

BODIES: list[tuple[type[BaseModel], Any, dict[str, Any]]] = [
    (LoadBody, wire.LoadRequest, {"name": "m"}),
    (GenerateBody, wire.GenerateRequest, {"model": "m", "prompt": "p"}),
    (ImageBody, wire.ImageRequest, {"model": "m"}),
]


@pytest.mark.parametrize("request_type", [wire.LoadRequest(
    "m", "text", "float16", "/models/m", "Net", True), wire.LoadRequest("m"), wire.GenerateRequest(
    "m", "p", 5, 0.0, 0.5, 7, ("\n",), 40, 1.2), wire.GenerateRequest("m", "p"), wire.ImageRequest(
    "m", "a cat", 3, 1, 7.5, 64, 128, 2), wire.ImageRequest("m")], ids=repr)
def test_a_body_the_client_writes_reads_back_as_the_same_request(request_type: Any) -> None:
    sent = json.loads(json.dumps(request_type.to_json()))
    assert type(request_type).from_json(sent) == request_type


@pytest.mark.parametrize(("body_type", "request_type", "least"), BODIES, ids=lambda x: getattr(x, "__name__", ""))
def test_the_server_body_left_at_its_defaults_is_the_wires_request(
        body_type: type[BaseModel], request_type: Any, least: dict[str, Any]) -> None:
    assert body_type(**least).request() == request_type(**least)  # type: ignore[attr-defined]


def _edges() -> list[tuple[type[BaseModel], dict[str, Any]]]:
    """Fields on both sides of each limit, per body."""
    load, gen, image = {"name": "m"}, {"model": "m", "prompt": "p"}, {"model": "m"}
    values: list[tuple[type[BaseModel], dict[str, Any], str, list[Any]]] = [
        (LoadBody, load, "kind", [*wire.KINDS, wire.DETECT, None, "pickle", ""]),
        (LoadBody, load, "dtype", [*wire.DTYPE_SPELLINGS, "int8", "float64", None]),
        (LoadBody, load, "name", ["", 3]),
        (GenerateBody, gen, "max_new_tokens", [0, 1, wire.MAX_NEW_TOKENS, wire.MAX_NEW_TOKENS + 1]),
        (GenerateBody, gen, "temperature", [-0.1, 0, wire.MAX_TEMPERATURE, wire.MAX_TEMPERATURE + 0.1]),
        (GenerateBody, gen, "temperature", [None]),
        (GenerateBody, gen, "top_p", [0, 1, 1.01, None]),
        (GenerateBody, gen, "top_k", [-1, 0, 50, 2.5, None]),
        (GenerateBody, gen, "repetition_penalty", [0, 1e-78, wire.MIN_REPETITION_PENALTY, 0.5, 1, wire.MAX_REPETITION_PENALTY,
                                                   wire.MAX_REPETITION_PENALTY + 0.1, None]),
        (GenerateBody, gen, "seed", [-1, 0, wire.MAX_SEED - 1, wire.MAX_SEED]),
        (GenerateBody, gen, "stop", [["x"] * wire.MAX_STOP_STRINGS, ["x"] * (wire.MAX_STOP_STRINGS + 1)]),
        (ImageBody, image, "steps", [0, 1, wire.MAX_STEPS, wire.MAX_STEPS + 1]),
        (ImageBody, image, "width", [0, 8, 12, wire.MAX_IMAGE_SIDE, wire.MAX_IMAGE_SIDE + 8]),
        (ImageBody, image, "height", [None, 4, 64]),
        (ImageBody, image, "guidance_scale", [-0.5, 0, wire.MAX_GUIDANCE_SCALE, 100.5]),
        (ImageBody, image, "num_images", [0, 1, wire.MAX_IMAGES, wire.MAX_IMAGES + 1]),
        (ImageBody, image, "seed", [-1, wire.MAX_SEED]),
        (ImageBody, image, "shape", [1]),
    ]
    return [(body, {**least, name: value}) for body, least, name, options in values for value in options]


@pytest.mark.parametrize(("body_type", "fields"), _edges(), ids=repr)
def test_the_server_body_and_the_wire_reader_accept_the_same_fields(
        body_type: type[BaseModel], fields: dict[str, Any]) -> None:
    """A field pydantic turns into a 422 is one the wire's reader refuses too, and the other way:
    the limits are written once, in the wire."""
    request_type: dict[type[BaseModel], Any] = {
        LoadBody: wire.LoadRequest, GenerateBody: wire.GenerateRequest, ImageBody: wire.ImageRequest}
    try:
        body_type.model_validate(fields)
        pydantic_accepts = True
    except ValidationError:
        pydantic_accepts = False
    try:
        request_type[body_type].from_json(fields)
        wire_accepts = True
    except wire.WireFormatError as exc:
        assert "\n" not in str(exc) and str(exc)
        wire_accepts = False
    assert pydantic_accepts == wire_accepts


@pytest.mark.parametrize(("body_type", "least"), [(LoadBody, {"name": "m"}), (GenerateBody, {"model": "m", "prompt": "p"})],
                         ids=["load", "generate"])
def test_the_originals_bodies_skip_unknown_fields_and_name_them(
        body_type: type[LoadBody | GenerateBody], least: dict[str, Any]) -> None:
    body = body_type.model_validate({**least, "temprature": 0.5, "device_map": "auto"})

    assert body.ignored() == ["device_map", "temprature"]
    assert body.request() == body_type(**least).request()
    assert wire.ignored_fields(type(body.request()), {**least, "temprature": 0.5}) == ["temprature"]


def test_a_dtype_spelling_reads_as_its_canonical_name() -> None:
    assert wire.LoadRequest.from_json({"name": "m", "dtype": "half"}).dtype == "float16"
    assert LoadBody(name="m", dtype="bf16").request().dtype == "bfloat16"
    assert {wire.canonical_dtype(spelling) for spelling in wire.DTYPE_SPELLINGS} == set(wire.DTYPES)


def test_a_load_body_without_a_kind_asks_the_server_to_detect_it() -> None:
    assert wire.LoadRequest.from_json({"name": "m", "kind": None}).kind == wire.DETECT
    assert wire.LoadRequest.from_json({"name": "m"}) == wire.LoadRequest("m", wire.DETECT, wire.DEFAULT_DTYPE)
    assert wire.LoadRequest("m", path="/models/m").source == "/models/m"


@pytest.mark.parametrize("message", [
    wire.token_message("hi"), wire.done_message({"text": "hi", "tokens_generated": 1, "stop_reason": "eos"}),
    wire.error_message("model 'm' is not loaded", 404), wire.cancel_message(),
], ids=lambda m: m["type"])
def test_each_generate_message_reads_back_as_its_type(message: dict[str, Any]) -> None:
    read = wire.read_generate_message(json.dumps(message))
    expected = {
        wire.MSG_TOKEN: wire.Token("hi"),
        wire.MSG_DONE: wire.Done({"tokens_generated": 1, "stop_reason": "eos"}),  # the text went as tokens
        wire.MSG_ERROR: wire.ErrorBody("model 'm' is not loaded", 404),
        wire.MSG_CANCEL: wire.Cancel(),
    }[message["type"]]
    assert read == expected


def test_a_generate_message_of_a_later_type_is_skipped_and_a_broken_one_refused() -> None:
    assert wire.read_generate_message('{"type": "usage", "tokens": 3}') == wire.Other("usage")
    for broken in ("not json", "[1, 2]", b"\x00"):
        with pytest.raises(wire.WireFormatError):
            wire.read_generate_message(broken)


def test_load_progress_lines_and_error_bodies_read_back() -> None:
    line = json.loads(wire.ndjson_line(wire.progress_event("weights", 0.123456, "(3/9 tensors)")))
    assert wire.read_progress_event(line) == wire.ProgressEvent("weights", 0.1235, "(3/9 tensors)")
    assert wire.read_error_body(line) is None
    final = {"status": "ok", "name": "m", "already_loaded": False}
    assert wire.read_progress_event(final) is None and wire.read_error_body(final) is None
    failure = wire.error_body("out of memory", 507, "oom")
    assert wire.read_error_body(json.loads(json.dumps(failure))) == wire.ErrorBody("out of memory", 507, "oom")
    assert wire.read_progress_event(failure) is None
