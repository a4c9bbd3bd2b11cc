"""``tokenizers`` in a session's namespace: the tokenizer each loaded text model came with.

Beside ``models`` (see ``execution.py``), so a Hugging Face example runs in a remote cell as
written, its ``tokenizer`` taken from here instead of loaded again::

    inputs = tokenizers[name](prompt, return_tensors="pt").to(DEVICE)
    out = models[name].generate(**inputs, max_new_tokens=5)
    tokenizers[name].decode(out[0])

A mapping of its own rather than an object that holds model and tokenizer: ``models[name]``
stays the model itself, which is what its users already pass around.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import NotFound

if TYPE_CHECKING:
    from .registry import Registry


class TokenizersView(Mapping[str, Any]):
    """Name -> the tokenizer of a loaded model that has one (``text`` models); always current."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Any:
        try:
            model = self._registry.get(name)
        except NotFound as exc:
            raise KeyError(str(exc)) from None
        if model.tokenizer is None:
            raise KeyError(f"model {name!r} is a {model.kind} model and has no tokenizer; only text models "
                           f"have one (with a tokenizer: {', '.join(self) or 'none loaded'})")
        return model.tokenizer

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> list[str]:
        names = []
        for name in self._registry.names():
            try:  # it may be unloaded meanwhile
                if self._registry.get(name).tokenizer is not None:
                    names.append(name)
            except NotFound:
                continue
        return names

    def __repr__(self) -> str:
        return f"tokenizers({', '.join(self._names()) or 'none loaded'})"
