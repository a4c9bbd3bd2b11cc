"""``python -m kernel_server`` (also ``mymps serve``): options -> Settings -> uvicorn.

Start-up problems (a bad option, a non-loopback bind, a busy port, a missing device, an empty
token file: each a ``ServerStartError``) end the process with one line on stderr and exit status
2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import socket
import sys
import threading
import time

from .errors import ServerStartError, SettingsError
from .lifecycle import Restarts, RunMarker, Stopper, describe_job, setup_logging, user_threads, watch_os_exit
from .settings import Settings, is_loopback, keep_alive_setting, parse_preload, parse_seconds, parse_size

log = logging.getLogger("kernel_server")

SWITCH_INTERVAL_S = 0.0005
GRACE_S = 3
"""How long a stop waits for the cancelled job to answer, and then for connections to close (an int:
uvicorn's ``timeout_graceful_shutdown`` is typed so)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mymps serve",
        description="Serve this machine's PyTorch device to mymps clients. Every option is also an "
        "environment variable MYMPS_<OPTION> (MYMPS_BIND for --host); options win. `mymps serve` supervises "
        "the server: when its process crashes it is started again with --restore (python -m kernel_server "
        "alone is not).",
    )
    p.add_argument("--host", help="address to bind (MYMPS_BIND, default 127.0.0.1; non-loopback needs --allow-remote)")
    p.add_argument("--port", type=int, help="TCP port (MYMPS_PORT, default 5555; 0 picks a free one)")
    p.add_argument("--device", choices=["auto", "mps", "cuda", "cpu"],
                   help="device (MYMPS_DEVICE, default auto: mps, cuda, cpu)")
    p.add_argument("--home", help="folder for the token and the log (MYMPS_HOME, default ~/.mymps)")
    p.add_argument("--token-file", help="token file (MYMPS_TOKEN_FILE, default $MYMPS_HOME/token)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="allow binding a non-loopback address (MYMPS_ALLOW_REMOTE=1); "
                   "the server runs any code sent to it")
    p.add_argument("--max-body", help="largest request or message, e.g. 4GiB, 512MiB (MYMPS_MAX_BODY, default 4GiB)")
    p.add_argument("--preload", action="append", metavar="NAME[:KIND[:DTYPE]]",
                   help="load this model at start (repeatable; MYMPS_PRELOAD comma-separated)")
    p.add_argument("--restore", action="store_true", default=None,
                   help="reload the models that were loaded when the server last stopped (MYMPS_RESTORE=1)")
    p.add_argument("--session-idle", help="seconds a disconnected notebook session keeps its namespace "
                   "(MYMPS_SESSION_IDLE, default 3600)")
    p.add_argument("--session-buffer", help="output a session keeps for a client that is not reading, e.g. 256MiB; "
                   "past it, output is dropped with a note (MYMPS_SESSION_BUFFER, default 256MiB)")
    p.add_argument("--keep-alive", metavar="DURATION",
                   help="how long a model stays loaded once idle, unless its load or a request says otherwise: "
                   "seconds, 5m, 1h, 0 (unload when idle) or -1 (forever) (MYMPS_KEEP_ALIVE, default -1)")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="the most memory the loaded models may take together, e.g. 20GiB, on a machine shared "
                   "with others (MYMPS_MEMORY_LIMIT, default: the device's own)")
    p.add_argument("--no-evict", action="store_true", default=None,
                   help="a load that does not fit fails with 507 instead of unloading the least recently used "
                   "idle models (MYMPS_NO_EVICT=1)")
    # `mymps serve`'s supervisor tells a restarted server what it recovers from (for /health).
    p.add_argument("--restarts", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--last-crash", help=argparse.SUPPRESS)
    return p


def restarts_from(argv: list[str] | None) -> Restarts:
    """The supervisor's account of earlier crashes (none when unsupervised)."""
    args = build_parser().parse_args(argv)
    return Restarts(args.restarts, args.last_crash)


def settings_from(argv: list[str] | None) -> Settings:
    from pathlib import Path

    args = build_parser().parse_args(argv)
    return Settings.from_env(flags=dict(
        host=args.host,
        port=args.port,
        device=args.device,
        home=Path(args.home).expanduser() if args.home else None,
        token_file=Path(args.token_file).expanduser() if args.token_file else None,
        allow_remote=args.allow_remote,
        max_body=parse_size(args.max_body, "--max-body") if args.max_body else None,
        session_idle=parse_seconds(args.session_idle, "--session-idle") if args.session_idle else None,
        session_buffer=parse_size(args.session_buffer, "--session-buffer") if args.session_buffer else None,
        preload=tuple(parse_preload(spec, "--preload") for spec in args.preload) if args.preload else None,
        restore=args.restore,
        keep_alive=keep_alive_setting(args.keep_alive, "--keep-alive") if args.keep_alive else None,
        memory_limit=parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else None,
        no_evict=args.no_evict,
    ))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it a keep-alive client's every request waited 40 ms (Nagle against delayed
    # ACKs: /health took 46 ms instead of 2). Accepted sockets also inherit the listener's flag.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running? "
                            "Pick another port with --port or stop the other one") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from(argv)
        restarts = restarts_from(argv)
        sock = _bind(settings.host, settings.port)
    except ServerStartError as exc:
        print(f"mymps serve: {exc}", file=sys.stderr)
        return 2
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)

    import uvicorn

    from .app import create_app, make_job_queue
    from .auth import TokenKeeper, load_or_create_token
    from .device import select_device
    from .jobs import INTERRUPT_SIGNAL
    from .serverstate import server_version

    try:
        device = select_device(settings.device)
        token = load_or_create_token(settings.resolved_token_file, settings.token)
    except (ServerStartError, OSError, RuntimeError) as exc:  # RuntimeError: torch's own, e.g. a broken driver
        print(f"mymps serve: {exc}", file=sys.stderr)
        sock.close()
        return 2
    keeper = TokenKeeper(token, None if settings.token else settings.resolved_token_file)  # `mymps token rotate`
    setup_logging(settings.home, lambda: keeper.known)
    marker = RunMarker(settings.home)
    jobs = make_job_queue(device, own_thread=False, on_running=marker.on_running)
    app = create_app(settings, token=keeper, device=device, jobs=jobs)
    app.state.restarts = restarts
    host, port = sock.getsockname()[:2]
    where = "" if is_loopback(settings.host) else " (REMOTE ACCESS ALLOWED)"
    token_source = "MYMPS_TOKEN" if settings.token else str(settings.resolved_token_file)
    log.info("mymps server %s on http://%s:%s%s, device %s (%s); token in %s; event loop %s",
             server_version(), host, port, where, device.kind, device.name, token_source,
             "uvloop" if importlib.util.find_spec("uvloop") else "asyncio (pip install uvloop: quicker calls)")
    marker.report_previous()
    if restarts.count:
        log.warning("started again by mymps serve (restart %d): %s", restarts.count, restarts.last_crash)
    marker.create(version=server_version(), address=f"{host}:{port}", home=str(settings.home))
    watch_os_exit(marker, lambda: describe_job(jobs.running) if jobs.running else "")
    config = uvicorn.Config(
        app, ws="websockets-sansio", ws_max_size=settings.max_body, log_level="warning",
        access_log=False, timeout_graceful_shutdown=GRACE_S,
    )
    server = uvicorn.Server(config)

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            jobs.close()  # ends jobs.work() below, also when the app failed to start

    def shut_down() -> None:
        jobs.close()  # running work is cancelled with a reason its client sees...
        jobs.wait_idle(timeout=GRACE_S)  # ...and given a moment to send it, before the sockets close
        server.should_exit = True

    http = threading.Thread(target=serve_http, name="mymps-http")

    def stuck() -> str:
        running = jobs.running
        parts = [f"{describe_job(running)} still runs" if running else "no job runs"]
        if http.is_alive():
            parts.append("the HTTP server is still closing its connections")
        others = [name for name in user_threads() if name != http.name]
        if others:
            parts.append(f"threads started by user code still run: {', '.join(others)}")
        return "; ".join(parts)

    stopper = Stopper(shut_down, on_force=marker.remove, stuck=stuck)
    # uvicorn installs no signal handlers off the main thread: these are the server's own.
    stopper.install()
    signal.signal(INTERRUPT_SIGNAL, jobs.on_interrupt_signal)
    # Three threads share the GIL (HTTP loop, device worker, user threads). Python's default 5 ms
    # switch interval is what a request waits when the worker runs Python: hand over sooner.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    http.start()
    jobs.work()  # device work runs here, on the main thread, so interrupts can break a sleep
    http.join()
    marker.remove()
    took = f" after {time.monotonic() - stopper.signalled_at:.1f} s" if stopper.reason else ""
    log.info("stopped (%s)%s", stopper.reason or "the HTTP server ended", took)
    stopper.finished()  # ends the process now if threads user code started still run
    return 0


if __name__ == "__main__":
    sys.exit(main())
