"""`TextCalls`: `Client`'s text generation methods, ``generate``, ``stream_generate`` and ``chat``.

A base class of `Client` rather than a part it delegates to: these are `Client`'s own public
methods (and `MympsClient` overrides two of them with the original's defaults); they live here so
that each module stays one screen per concern. They send through the `RestCalls` and the
`Connection` that `Client` builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from mymps_magic import _chat
from mymps_magic._rest import generation_request
from mymps_magic.wire import GenerateRequest, KeepAlive

if TYPE_CHECKING:
    from mymps_magic._chat import Messages
    from mymps_magic._connection import Connection
    from mymps_magic._rest import RestCalls
    from mymps_magic._stream import TokenStream


class TextCalls:
    """Text generation on a loaded text model: whole, streamed, or as a chat."""

    _connection: Connection
    _rest: RestCalls

    def generate(self, model: str, prompt: str, max_new_tokens: int = GenerateRequest.max_new_tokens,
                 temperature: float | None = None, top_p: float | None = None, *, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, keep_alive: KeepAlive | None = None) -> dict[str, Any]:
        """Generate text and return it when done (see `stream_generate` for pieces as they come).

        Args:
            model: a loaded text model's name.
            prompt: the text to continue.
            max_new_tokens: at most this many new tokens (1..8192).
            temperature: sampling temperature (0..10); 0 means greedy.
            top_p: nucleus sampling mass, in (0, 1].
            seed: makes sampling repeatable.
            stop: a string, or strings, that end the generation when produced.
            top_k: sample among the k likeliest tokens (0: no limit).
            repetition_penalty: > 0; tokens already seen are made less likely by it (1: off).
                The sampling settings left at None are the model's own (its ``generation_config``,
                as ``model.generate`` reads it: greedy unless that says ``do_sample``).
            keep_alive: how long the model stays loaded once idle after this request: seconds,
                -1 forever, 0 unload when done, or a duration such as ``"5m"``; None: as it was.

        Returns:
            ``{"text", "tokens_generated", "time_s", "tokens_per_s",
            "stop_reason": "max_tokens" | "eos" | "stop" | "cancelled"}``; ``text`` excludes the prompt.

        Raises:
            NotFoundError: the model is not loaded.
            BadRequestError: an argument out of range.
        """
        return self._rest.generate(generation_request(model, prompt, max_new_tokens, temperature, top_p, seed, stop,
                                                      top_k, repetition_penalty, keep_alive))

    def stream_generate(self, model: str, prompt: str, max_new_tokens: int = GenerateRequest.max_new_tokens,
                        temperature: float | None = None, top_p: float | None = None, *, seed: int | None = None,
                        stop: str | Sequence[str] | None = None, top_k: int | None = None,
                        repetition_penalty: float | None = None, keep_alive: KeepAlive | None = None) -> TokenStream:
        """Generate text and receive it piece by piece.

        Nothing is sent until the stream is used. Use it with ``for piece in ...`` or, as in
        the original client, ``async with ... as s: async for piece in s``. Closing it early
        cancels the generation on the server; afterwards ``stream.stats`` holds the figures.

        Args and errors: as for `generate`; errors are raised while iterating.

        Returns:
            A `TokenStream` of text pieces.
        """
        return self._rest.stream_generate(generation_request(model, prompt, max_new_tokens, temperature, top_p,
                                                             seed, stop, top_k, repetition_penalty, keep_alive))

    @overload
    def chat(self, model: str, messages: Messages, stream: Literal[False] = False, *,
             max_new_tokens: int = ..., temperature: float | None = ..., top_p: float | None = ...,
             seed: int | None = ..., stop: str | Sequence[str] | None = ..., top_k: int | None = ...,
             repetition_penalty: float | None = ..., chat_template: str | None = ...,
             keep_alive: KeepAlive | None = ...) -> dict[str, Any]: ...

    @overload
    def chat(self, model: str, messages: Messages, stream: Literal[True], *,
             max_new_tokens: int = ..., temperature: float | None = ..., top_p: float | None = ...,
             seed: int | None = ..., stop: str | Sequence[str] | None = ..., top_k: int | None = ...,
             repetition_penalty: float | None = ..., chat_template: str | None = ...,
             keep_alive: KeepAlive | None = ...) -> TokenStream: ...

    def chat(self, model: str, messages: Messages, stream: bool = False, *,
             max_new_tokens: int = GenerateRequest.max_new_tokens, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
             top_k: int | None = None, repetition_penalty: float | None = None,
             chat_template: str | None = None, keep_alive: KeepAlive | None = None) -> dict[str, Any] | TokenStream:
        """Continue a conversation: the server's chat template writes the prompt from ``messages``.

        Args:
            model: a loaded text model's name; its tokenizer needs a chat template, or give one.
            messages: ``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]``.
            stream: return a `TokenStream` of the reply's pieces (over ``/ws/chat``) instead.
            max_new_tokens, temperature, top_p, seed, stop, top_k, repetition_penalty, keep_alive:
                as for `generate` (None: the model's ``generation_config``).
            chat_template: a Jinja chat template to use instead of the tokenizer's own.

        Returns:
            `generate`'s answer plus ``"message": {"role": "assistant", "content": text}`` and
            ``"prompt_tokens"``; with ``stream=True`` a `TokenStream` whose ``stats`` end the
            same way. Append ``message`` to ``messages`` to go on with the conversation.

        Raises:
            BadRequestError: bad messages (before anything is sent), an argument out of range, a
                model without a chat template (the message says how to give one), or a template
                that fails.
            NotFoundError: the model is not loaded.
        """
        request = _chat.chat_request(model, messages, chat_template, {
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
            "stop": stop, "top_k": top_k, "repetition_penalty": repetition_penalty, "keep_alive": keep_alive})
        if stream:
            return _chat.stream_chat(self._connection, request)
        return _chat.chat(self._connection, request)
