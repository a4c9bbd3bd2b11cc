"""`SameOriginGuard`: what keeps other web pages in the user's browser away from the dashboard.

The dashboard acts with the server's token, so a page on another site must not make it act:
every request that changes something must be a POST whose ``Origin`` is the dashboard itself
(a cross-site form or ``fetch`` carries the other site's origin). And while it listens on
loopback, it answers only to loopback names in ``Host``, so a site that re-points its own DNS
name at 127.0.0.1 (DNS rebinding, where ``Origin`` and ``Host`` agree) gets nothing.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mymps_magic.dashboard.settings import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD"})


class SameOriginGuard:
    """ASGI middleware: a 403 for a foreign ``Host`` (unless ``allow_any_host``) and for any
    request other than GET/HEAD whose ``Origin`` is missing or is not the dashboard's own.

    Args:
        app: the application to guard.
        allow_any_host: accept any ``Host`` (the dashboard was bound with ``--allow-remote``).
    """

    def __init__(self, app: ASGIApp, *, allow_any_host: bool) -> None:
        self.app = app
        self.allow_any_host = allow_any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await PlainTextResponse(refusal, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> str | None:
        """Why this request is refused, or None to let it through."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.allow_any_host and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return (f"refused: Host {host!r} is not a loopback name; open the dashboard at "
                    "http://127.0.0.1:<port>/ (or start it with --allow-remote)")
        if scope["method"] not in SAFE_METHODS and urlsplit(headers.get("origin", "")).netloc != host:
            return "refused: changes are accepted only from the dashboard's own page (Origin must match Host)"
        return None
