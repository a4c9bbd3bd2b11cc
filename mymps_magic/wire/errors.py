"""The wire's own errors: a payload that does not follow the format."""

from __future__ import annotations


class WireFormatError(ValueError):
    """A payload does not follow the wire format; the message says which part is wrong."""


class FrameTooLarge(WireFormatError):
    """A session frame declares more bytes than the receiver accepts."""
