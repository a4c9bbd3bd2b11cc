"""The body of ``POST /chat`` and the first message of ``/ws/chat``: :class:`ChatRequest`.

A chat is a generation whose prompt the model's chat template writes from the messages, so its
sampling fields are exactly :class:`.bodies.GenerateRequest`'s (``prompt`` aside): a chat request
holds one, and its limits and defaults are read by the same reader. Whatever the generation
request gains, a chat gains with it. The answers and the stream's messages are ``/generate``'s
and ``/ws/generate``'s (:mod:`.generate_stream`); ``POST /chat`` adds the reply as ``message``
(``{"role": "assistant", "content": ...}``) and ``prompt_tokens``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from .bodies import GenerateRequest
from .errors import WireFormatError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)
MAX_MESSAGES: Final = 1024

_OWN_FIELDS = ("model", "messages", "chat_template")
_GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateRequest) if f.name not in ("model", "prompt"))
_SHAPE = "a chat request must be a JSON object {model, messages: [{role, content}, ...], max_new_tokens, ...}"


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation.

    Args:
        role: one of :data:`ROLES`.
        content: its text.
    """

    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatRequest:
    """A conversation to continue, as the client sends it and the server runs it.

    Args:
        messages: the conversation so far (1 to :data:`MAX_MESSAGES`), usually ending with the
            user's message.
        generation: the model's name and the sampling fields, as for ``/generate``; its
            ``prompt`` stays empty: the chat template writes it.
        chat_template: a Jinja template to use instead of the tokenizer's own (needed for a
            model whose tokenizer has none), or None.
    """

    messages: tuple[ChatMessage, ...]
    generation: GenerateRequest
    chat_template: str | None = None

    @property
    def model(self) -> str:
        return self.generation.model

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent: the generation's fields without ``prompt``, and the messages."""
        body = {key: value for key, value in self.generation.to_json().items() if key != "prompt"}
        body["messages"] = [message.to_json() for message in self.messages]
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        return body

    def generate_request(self, prompt: str) -> GenerateRequest:
        """The generation to run once the template has written ``prompt``."""
        return dataclasses.replace(self.generation, prompt=prompt)

    @classmethod
    def from_json(cls, body: Any) -> ChatRequest:
        """Read and check a request written by :meth:`to_json` (left-out fields take the
        defaults of :class:`.bodies.GenerateRequest`).

        Raises:
            WireFormatError: a field is missing, unknown, of the wrong type or out of its range.
        """
        if not isinstance(body, Mapping):
            raise WireFormatError(_SHAPE)
        known = (*_OWN_FIELDS, *_GENERATION_FIELDS)
        unknown = sorted(set(body) - set(known))
        if unknown:
            raise WireFormatError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise WireFormatError("a chat request needs 'model' as a non-empty string")
        template = body.get("chat_template")
        if template is not None and (not isinstance(template, str) or not template):
            raise WireFormatError("chat_template must be a non-empty Jinja template string, or null")
        sampling = {key: body[key] for key in _GENERATION_FIELDS if key in body}
        # The placeholder prompt only passes the reader; the template writes the real one.
        generation = GenerateRequest.from_json({**sampling, "model": model, "prompt": "-"})
        return cls(read_messages(body.get("messages")), dataclasses.replace(generation, prompt=""), template)


def read_messages(messages: Any) -> tuple[ChatMessage, ...]:
    """Check a conversation, as JSON objects or :class:`ChatMessage` s.

    Raises:
        WireFormatError: not a non-empty list of ``{role, content}`` with a known role and text.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise WireFormatError('messages must be a non-empty list of {"role": ..., "content": ...}, '
                              f"not {messages!r:.80}")
    if len(messages) > MAX_MESSAGES:
        raise WireFormatError(f"at most {MAX_MESSAGES} messages, not {len(messages)}")
    read = []
    for index, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            message = message.to_json()
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise WireFormatError(f'messages[{index}] must be {{"role": ..., "content": ...}}, not {message!r:.80}')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise WireFormatError(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise WireFormatError(f"messages[{index}].content must be a string, not {content!r:.80}")
        read.append(ChatMessage(role, content))
    return tuple(read)
