"""What the OpenAI-compatible endpoints read and write: the request bodies as OpenAI's clients send
them (pydantic, for the 400 and the OpenAPI schema), and the answers, chunks and errors in
OpenAI's shapes (``openai_api.py`` serves them).

The requests take OpenAI's names (``max_tokens``, ``max_completion_tokens``, ``n``,
``stream_options``) and some that OpenAI lacks: ``top_k``, ``repetition_penalty`` and, for a chat,
``chat_template`` (what vLLM also takes) and Ollama's ``keep_alive``; the ``openai`` client sends
them with ``extra_body``.
Fields OpenAI has and a local model cannot honour (``user``, ``logprobs: false``,
``presence_penalty`` ...) are ignored, as other compatible servers do; ``n`` above 1 and content
that is not text are refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mymps_magic import wire

from .errors import BadRequest
from .schemas import KeepAlive

OWNER = "mymps"
OPENAI_PREFIX = "/v1"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both completion requests share."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=wire.MAX_NEW_TOKENS,
                                   description=f"left out: up to {wire.MAX_NEW_TOKENS}, or the model's context")
    temperature: float | None = Field(None, ge=0.0, le=wire.MAX_TEMPERATURE, description="left out: the model's own")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="left out: the model's own")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = Field(None, description=f"at most {wire.MAX_STOP_STRINGS} strings")
    seed: int | None = Field(None, ge=0, lt=wire.MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0, description="not OpenAI's: sample among the k likeliest tokens")
    repetition_penalty: float | None = Field(None, ge=wire.MIN_REPETITION_PENALTY, le=wire.MAX_REPETITION_PENALTY,
                                             description="not OpenAI's: 1 is off")
    keep_alive: KeepAlive = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def generation(self, prompt: str, max_tokens: int | None = None) -> wire.GenerateRequest:
        """The generation this request asks for (``prompt`` empty for a chat: its template writes it).

        Raises:
            BadRequest: a field the wire's reader refuses (the stop strings).
        """
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        body = {"model": self.model, "prompt": prompt or "-", "max_new_tokens": max_tokens or wire.MAX_NEW_TOKENS,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": stop,
                "keep_alive": self.keep_alive}
        try:
            request = wire.GenerateRequest.from_json({key: value for key, value in body.items() if value is not None})
        except wire.WireFormatError as exc:
            raise BadRequest(str(exc)) from None
        return request if prompt else replace(request, prompt="")


class TextPart(BaseModel):
    """A part of a message's content; only text parts, a local text model reads nothing else."""

    type: Literal["text"]
    text: str


class ChatMessageBody(BaseModel):
    """One message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def message(self) -> wire.ChatMessage:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return wire.ChatMessage("system" if self.role == "developer" else self.role, content)


class ChatCompletionBody(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageBody] = Field(min_length=1, max_length=wire.MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=wire.MAX_NEW_TOKENS, description="as max_tokens")
    chat_template: str | None = Field(None, min_length=1, description="not OpenAI's (vLLM's): a Jinja chat "
                                      "template instead of the tokenizer's own")

    def messages_read(self) -> tuple[wire.ChatMessage, ...]:
        return tuple(message.message() for message in self.messages)


class CompletionBody(_Sampling):
    """``POST /v1/completions``: one prompt (a list holding one is taken too)."""

    prompt: str | list[str] = Field(min_length=1)

    def text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise BadRequest("prompt: send one non-empty prompt per request (a string, or a list of one)")
        return prompts[0]


def error_body(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    """An error as OpenAI answers it: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_code(status: int) -> str | None:
    """OpenAI's ``code`` for the statuses its clients tell apart."""
    return {401: "invalid_api_key", 404: "model_not_found"}.get(status)


def finish_reason(result: Mapping[str, Any]) -> str:
    """OpenAI's ``finish_reason`` out of a generation's ``stop_reason``: ``length`` when a limit
    cut it (``max_new_tokens`` or the context), else ``stop``."""
    return "length" if result["stop_reason"] in ("length", "max_tokens") else "stop"


def usage(result: Mapping[str, Any]) -> dict[str, int]:
    prompt, completion = int(result["prompt_tokens"]), int(result["tokens_generated"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Answer:
    """One completion's answer and stream chunks, chat or text, under one id and time."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The non-streamed answer."""
        text = {"message": {"role": "assistant", "content": result["text"]}} if self.chat else {"text": result["text"]}
        choice = {"index": 0, **text, "logprobs": None, "finish_reason": finish_reason(result)}
        return {**self._head(False), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        """One streamed piece (``text`` None: the chat's opening chunk with the role, or the last
        chunk with ``finish``)."""
        if self.chat:
            delta: dict[str, Any] = {} if finish else {"role": "assistant", "content": ""} if text is None else {
                "content": text}
            piece: dict[str, Any] = {"delta": delta}
        else:
            piece = {"text": text or ""}
        return {**self._head(True), "choices": [{"index": 0, **piece, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The last chunk when the request asked ``stream_options.include_usage``."""
        return {**self._head(True), "choices": [], "usage": usage(result)}
