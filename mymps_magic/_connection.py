"""The transport boundary: HTTP requests and WebSocket opening, and their errors.

Every httpx and websockets exception, and every error answer of the server, is translated into
a `mymps_magic.errors` type here and nowhere else, so the rest of the client deals only in mymps
errors whose one-line messages say what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from mymps_magic import errors, wire
from mymps_magic._settings import Settings

# A server that is up accepts a TCP connection at once; waiting longer only delays the message
# that says the tunnel or the server is down.
CONNECT_TIMEOUT = 5.0

FIX_LINK = "Is the tunnel up (`mymps tunnel`) and the server running (`mymps serve`)?"

_SEND_STEP = 16 << 20

# WebSocket close code the server uses for a missing or wrong token (policy violation).
WS_CLOSE_POLICY = 1008
WS_CLOSE_TOO_BIG = 1009
LINK_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013})
"""Close codes that say nothing about the request (going away, abnormal end, server error,
restart, try later): the link or the server's run ended, and a reconnect may well succeed."""


class Connection:
    """One server's HTTP client (kept alive across calls) plus what WebSockets to it need.

    Args:
        settings: the server's address and token.
        timeout: seconds to wait for the answer to a short call. Calls made with ``wait=True``
            (generation, images, loading) wait as long as the work takes.
    """

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._connect_timeout = min(timeout, CONNECT_TIMEOUT)
        # trust_env=False: the server is the local end of an SSH tunnel (or the machine itself);
        # an HTTP proxy from the environment would only get in the way.
        self._http = httpx.Client(
            base_url=f"http://{settings.address}",
            headers=self.headers,
            timeout=httpx.Timeout(timeout, connect=self._connect_timeout),
            trust_env=False,
        )

    def ws_url(self, path: str) -> str:
        return f"ws://{self.settings.address}{path}"

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        wait: bool = False,
    ) -> httpx.Response:
        """Send one request and return its successful answer.

        Raises:
            MympsError: the matching subclass, for transport failures and error answers.
        """
        with self.translate():
            response = self._http.request(
                method, path, json=json_body, content=content, headers=headers, timeout=self._timeout(wait)
            )
        self.raise_for_answer(response)
        return response

    def json(self, method: str, path: str, *, json_body: Any = None, wait: bool = False) -> dict[str, Any]:
        """Send a request whose answer is a JSON object, and return that object."""
        return self._decode(self.request(method, path, json_body=json_body, wait=wait))

    def ndjson(self, method: str, path: str, *, json_body: Any) -> Iterator[dict[str, Any]]:
        """Send a request that answers with NDJSON lines, and yield each line's object.

        A server that answers with one plain JSON object instead yields just that object.

        Raises:
            MympsError: transport failures, an error status, or a final ``{"error"}`` line
                (mapped by its optional ``status`` field, else `ServerError`).
        """
        headers = {"Accept": wire.NDJSON}
        with self.translate(), self._http.stream(
            method, path, json=json_body, headers=headers, timeout=self._timeout(True)
        ) as response:
            if response.status_code >= 400:
                response.read()
                self.raise_for_answer(response)
            if not response.headers.get("content-type", "").startswith(wire.NDJSON):
                response.read()
                yield self._decode(response)
                return
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise self._not_mymps(response.status_code) from None
                failure = wire.read_error_body(obj)
                if failure is not None:
                    raise self.error_from(failure)
                yield obj

    def put_stream(self, path: str, parts: list[bytes | memoryview]) -> dict[str, Any]:
        """PUT a large body straight from ``parts``, and return the JSON object of the answer.

        http.client, not httpx: httpx would join each part into a new bytes object, and these
        parts are an array's own memory.

        Raises:
            MympsError: the matching subclass, for transport failures and error answers.
        """
        import http.client

        length = sum(memoryview(part).nbytes for part in parts)
        conn = http.client.HTTPConnection(self.settings.host, self.settings.port, timeout=max(self.timeout, 30.0))
        try:
            with self.ws_errors():
                conn.putrequest("PUT", path, skip_accept_encoding=True)
                for name, value in {**self.headers, "Content-Type": "application/octet-stream",
                                    "Content-Length": str(length)}.items():
                    conn.putheader(name, value)
                conn.endheaders()
                for part in parts:
                    view = memoryview(part).cast("B")
                    for start in range(0, view.nbytes, _SEND_STEP):  # each step gets the whole timeout
                        conn.send(view[start:start + _SEND_STEP])
                response = conn.getresponse()
                body = response.read()
        except http.client.HTTPException:  # the answer was cut off (IncompleteRead, BadStatusLine)
            raise errors.ConnectionError(
                f"Lost the connection to {self.settings.address} before the answer came. {FIX_LINK}") from None
        finally:
            conn.close()
        self._raise_for_status(response.status, body)
        return self._json_object(response.status, body)

    def _timeout(self, wait: bool) -> httpx.Timeout | float:
        if wait:
            return httpx.Timeout(None, connect=self._connect_timeout)
        return httpx.Timeout(self.timeout, connect=self._connect_timeout)

    @contextmanager
    def translate(self) -> Iterator[None]:
        """Turn httpx's transport exceptions raised inside the block into mymps errors."""
        address = self.settings.address
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise errors.ConnectionError(f"Cannot reach {address}. {FIX_LINK}") from None
        except httpx.TimeoutException:
            raise errors.TimeoutError(
                f"No answer from {address} within {self.timeout:g} s. "
                "Check the server's log, or give the Client a larger timeout."
            ) from None
        except httpx.TransportError:
            raise errors.ConnectionError(
                f"Lost the connection to {address} before the answer came. {FIX_LINK}") from None

    @contextmanager
    def ws_errors(self) -> Iterator[None]:
        """Turn websockets' and the socket's exceptions raised inside the block into mymps errors.

        An ``async`` function uses it too, as a plain ``with`` around its awaits.
        """
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        from mymps_magic._websocket import Closed, HandshakeError

        address = self.settings.address
        try:
            yield
        except errors.MympsError:
            raise  # already translated (and ConnectionError is an OSError: keep it from below)
        except (InvalidStatus, HandshakeError) as exc:
            status, body = (exc.status, exc.body) if isinstance(exc, HandshakeError) else (
                exc.response.status_code, exc.response.body)
            failure = _error_of(body or b"")
            if status in (401, 403):
                raise self.auth_error(failure.message or None) from None
            raise errors.error_for_status(status, _error_message(failure, status), failure.code) from None
        except (ConnectionClosed, Closed) as exc:
            if isinstance(exc, Closed):
                code, reason = exc.code, exc.reason
            else:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (None, "")
            raise self.closed_error(code, reason) from None
        except (InvalidHandshake, OSError):  # OSError covers refused connections and open timeouts
            raise errors.ConnectionError(f"Cannot reach {address}. {FIX_LINK}") from None

    def closed_error(self, code: int | None, reason: str) -> errors.MympsError:
        """The error for a WebSocket the server closed: with the server's own reason when it
        gave one (``Is the tunnel up?`` would send the user the wrong way), else a lost link."""
        if code == WS_CLOSE_POLICY:
            return self.auth_error(reason or None)
        if code is None or code in LINK_CLOSE_CODES or not reason:
            return errors.ConnectionError(
                f"Lost the connection to {self.settings.address} before the answer came. {FIX_LINK}")
        return errors.ClosedError(f"The server at {self.settings.address} closed the connection: {reason.rstrip('.')} "
                                  f"(WebSocket close code {code}).", close_code=code)

    def raise_for_answer(self, response: httpx.Response) -> None:
        """Raise the mymps error for an error answer; do nothing for a successful one."""
        self._raise_for_status(response.status_code, response.content)

    def _raise_for_status(self, status: int, body: bytes) -> None:
        if status < 400:
            return
        failure = _error_of(body)
        if status == 401:
            raise self.auth_error(failure.message or None)
        raise errors.error_for_status(status, _error_message(failure, status), failure.code)

    def error_from(self, failure: wire.ErrorBody) -> errors.MympsError:
        """The error for an ``{"error", "status"?}`` NDJSON line or WebSocket message, where no
        HTTP status carries the error's."""
        message = failure.message or "The server reported an error without a message."
        if failure.status == 401:
            return self.auth_error(message)
        if failure.status is not None:
            return errors.error_for_status(failure.status, message, failure.code)
        return errors.ServerError(message)

    def auth_error(self, server_says: str | None = None) -> errors.AuthError:
        """The error for a refused token; it names where the token came from and the token file
        this client reads (the real path, not a fixed ``~/.mymps/token``), never the token.
        ``server_says`` is the server's own reason, which names the server's token file."""
        settings = self.settings
        where = settings.token_file if settings.token_file is not None else "the token file (MYMPS_TOKEN_FILE)"
        fix = f"Set MYMPS_TOKEN or copy the server's token into {where} (`mymps tunnel` fetches it)."
        said = f" The server says: {server_says.rstrip('.')}." if server_says else ""
        if settings.token_source == "none":
            return errors.AuthError(f"No token found, and {settings.address} needs one.{said} {fix}", status_code=401)
        return errors.AuthError(f"The server refused the token (from {settings.token_source}).{said} {fix}",
                                status_code=401)

    def _decode(self, response: httpx.Response) -> dict[str, Any]:
        return self._json_object(response.status_code, response.content)

    def _json_object(self, status: int, body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body)
        except ValueError:
            raise self._not_mymps(status) from None
        if not isinstance(obj, dict):
            raise self._not_mymps(status)
        return obj

    def _not_mymps(self, status: int) -> errors.ServerError:
        return errors.ServerError(
            f"{self.settings.address} answered HTTP {status} with something mymps cannot read. "
            "Is a mymps server listening there (`mymps serve`)?",
            status_code=status,
        )


def _error_of(body: bytes | bytearray) -> wire.ErrorBody:
    """The error an answer's body carries; an empty one where it is not an error body."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    return wire.read_error_body(obj) or wire.ErrorBody("")


def _error_message(failure: wire.ErrorBody, status: int) -> str:
    """The server's ``{"error": ...}`` message, or a fallback naming the status."""
    return failure.message or f"The server answered HTTP {status} without saying why; see its log."
