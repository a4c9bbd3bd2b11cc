"""`mymps dashboard`: a web page on the Linux side that shows and steers the accelerator.

It serves the panel's view (connection, device memory, models, jobs, last errors) as a page that
refreshes itself while open, with load, unload, cancel and a streamed generation box. It talks to
the server through the tunnel as `Client()` does (``MYMPS_SERVER_HOST``, ``MYMPS_SERVER_PORT``,
the token file), and the token stays in this process. Needs the ``dashboard`` extra
(Starlette, Jinja2, uvicorn).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the dashboard until interrupted.

    Args:
        argv: the options (``--host``, ``--port``, ``--allow-remote``, ``--refresh``,
            ``--server-host``, ``--server-port``); ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after a clean stop, 2 when the settings are refused.
    """
    args = _parser().parse_args(argv)
    from mymps_magic.client import Client
    from mymps_magic.dashboard.settings import DashboardSettings
    from mymps_magic.errors import MympsError

    try:
        settings = DashboardSettings.resolve(os.environ, args.host, args.port, allow_remote=args.allow_remote,
                                             refresh_s=args.refresh)
        client = Client(args.server_host, args.server_port)
    except MympsError as exc:
        print(f"mymps dashboard: {exc}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from mymps_magic.dashboard.app import create_app
    except ImportError as exc:
        print(f"mymps dashboard: {exc.name} is missing; install the extra: pip install 'mymps[dashboard]'",
              file=sys.stderr)
        return 2
    with client:
        print(f"mymps dashboard: http://{settings.host}:{settings.port}/ (server {client.settings.address})",
              flush=True)
        uvicorn.run(create_app(client, settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mymps dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="address to bind (MYMPS_DASH_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (MYMPS_DASH_PORT, default 8080)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="bind a non-loopback address: anyone who reaches it acts on the server")
    parser.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                        help="how often an open page refreshes itself (default 5)")
    parser.add_argument("--server-host", help="the server (MYMPS_SERVER_HOST, default 127.0.0.1)")
    parser.add_argument("--server-port", type=int, help="the server's port (MYMPS_SERVER_PORT, default 5555)")
    return parser
