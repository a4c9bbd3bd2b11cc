"""`mymps token rotate`: a new server token, in force at once, the old one refused.

Run it on the machine of the server. It writes a new token into the server's token file
(``MYMPS_TOKEN_FILE``, else ``$MYMPS_HOME/token``; mode 0600, replaced atomically). The running
server follows that file (it stats it on each request), so no restart is needed; clients on this
machine read the file when they start, and `mymps tunnel` on another machine fetches the new token
when it next connects (restart it, or wait for its next reconnection). Connections already open
keep going: a session opened with the old token is not cut.

Then it asks the server on the local port (as `Client` finds it) whether the new token is
accepted, and says so in one line; the token itself is never printed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

CHECK_TIMEOUT_S = 10.0


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mymps token rotate [--token-file FILE] [--port N]``."""
    token = verbs.add_parser("token", help="manage the server's token (mymps token rotate)",
                             description="Manage the server's token on this machine.")
    actions = token.add_subparsers(dest="action", required=True)
    rotate = actions.add_parser(
        "rotate", help="write a new token; the running server refuses the old one from now on",
        description="Write a new token into the server's token file (0600). The running server uses it from "
        "its next request on and refuses the old one; clients here read it when they start, `mymps tunnel` "
        "fetches it when it next connects.")
    rotate.add_argument("--token-file", metavar="FILE",
                        help="the server's token file (default: MYMPS_TOKEN_FILE, else $MYMPS_HOME/token, "
                             "else ~/.mymps/token)")
    rotate.add_argument("--port", help="the local server to check (default: MYMPS_SERVER_PORT, else MYMPS_PORT, "
                                       "else 5555)")


def run(args: argparse.Namespace) -> int:
    """Rotate the token; 0 when the server accepts the new one (or none runs here), else 1."""
    from mymps_magic import errors
    from mymps_magic._settings import default_token_file
    from mymps_magic.cli.tunnel import write_token
    from mymps_magic.client import Client

    path = Path(args.token_file).expanduser() if args.token_file else default_token_file(os.environ)
    token = secrets.token_hex(32)  # as the server makes them: 256 bits, never a leading "-"
    try:
        write_token(path, token)
    except OSError as exc:
        print(f"mymps token: cannot write {path} ({exc.strerror}); check the folder's permissions.", file=sys.stderr)
        return 1
    print(f"mymps token: a new token is in {path} (mode 0600).")
    if os.environ.get("MYMPS_TOKEN"):
        print("mymps token: MYMPS_TOKEN is set here: a server started with it keeps that token; unset it and "
              "restart the server to use the token file.")
    try:
        client = Client(port=args.port, token=token, timeout=CHECK_TIMEOUT_S)
    except errors.MympsError as exc:  # a bad --port or MYMPS_PORT
        print(f"mymps token: {exc}", file=sys.stderr)
        return 1
    address = client.settings.address
    try:
        with client:
            client.models()
    except errors.AuthError:
        print(f"mymps token: the server at {address} refuses the new token: it was started with another "
              "token file or with MYMPS_TOKEN; restart it, or give its file with --token-file.", file=sys.stderr)
        return 1
    except errors.MympsError:
        print(f"mymps token: no server answers at {address} now; it uses the new token when it starts.")
        return 0
    print(f"mymps token: the server at {address} accepts the new token and refuses the old one. "
          "Clients elsewhere need it: `mymps tunnel` fetches it when it next connects.")
    return 0
