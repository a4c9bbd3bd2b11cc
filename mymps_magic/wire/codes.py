"""Error codes: the ``code`` of a session ``error`` frame and of a REST error body."""

from __future__ import annotations

ERROR_CONFLICT = "conflict"
"""``code`` of a 409 that is not a cancellation: the name is loaded as another kind or dtype."""
