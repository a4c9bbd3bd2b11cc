"""`Client.chat`'s calls: ``POST /chat`` for the whole reply, ``/ws/chat`` for its pieces.

A chat is a generation whose prompt the server's chat template writes from the messages
(`wire.ChatRequest`), so it takes `Client.generate`'s sampling arguments and answers as it does,
plus the reply as ``message``; its stream is a `TokenStream` over ``/ws/chat``, whose messages
are ``/ws/generate``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mymps_magic import errors, wire
from mymps_magic._rest import generation_request
from mymps_magic._stream import TokenStream

if TYPE_CHECKING:
    from mymps_magic._connection import Connection

CHAT_PATH = "/ws/chat"

Messages = Sequence[Mapping[str, str] | wire.ChatMessage]
"""A conversation: ``{"role": ..., "content": ...}`` dicts (or `wire.ChatMessage` s)."""


def chat_request(model: str, messages: Messages, chat_template: str | None, sampling: Mapping[str, Any]
                 ) -> wire.ChatRequest:
    """The request of ``POST /chat`` and the first message of ``/ws/chat``.

    Args:
        sampling: `Client.generate`'s keyword arguments (``max_new_tokens``, ``temperature``...).

    Raises:
        BadRequestError: the messages are not a non-empty list of ``{role, content}``.
    """
    try:
        read = wire.read_messages(messages)
    except wire.WireFormatError as exc:
        raise errors.BadRequestError(f"{exc}; e.g. [{{'role': 'user', 'content': 'Hello'}}]") from None
    return wire.ChatRequest(read, generation_request(model=model, prompt="", **sampling), chat_template)


def chat(connection: Connection, request: wire.ChatRequest) -> dict[str, Any]:
    return connection.json("POST", "/chat", json_body=request.to_json(), wait=True)


def stream_chat(connection: Connection, request: wire.ChatRequest) -> TokenStream:
    return TokenStream(connection, request, path=CHAT_PATH)
