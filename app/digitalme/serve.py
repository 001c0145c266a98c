"""Runs the HTTP server: on the listening socket systemd hands over, or on its own.

Under systemd, ``digitalme.socket`` owns the listening socket (``ListenStream=``), so the
socket and its kernel backlog outlive any one process of ``digitalme.service``: while the
service restarts (an upgrade, a rollback, a changed setting), new connections wait in the
backlog and the next process answers them; nothing is refused (docs/operations/upgrades.md).
Without systemd's socket (``scripts/run-local.sh``, tests, a container) the server binds
``DIGITALME_LISTEN`` itself.

A stop (SIGTERM) is graceful, in this order: stop accepting (connections keep arriving in
the backlog, for the next process); wait a moment for connections already accepted to
deliver their request; then let aiohttp close idle connections and wait up to
``SHUTDOWN_GRACE_SECONDS`` for requests in flight, streams included, to finish.
With ``Type=notify`` the service tells systemd when it accepts (``READY=1``), so
``systemctl restart`` returns when the new process serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

log = logging.getLogger(__name__)

# listen() backlog. systemd's socket unit asks for the same (Backlog=); listen() on the
# inherited socket must not shrink it. The kernel caps it at net.core.somaxconn.
BACKLOG = 4096
# Between "stop accepting" and "close idle connections": a connection accepted a moment
# before the stop has its request in flight; closing it unanswered would fail a request
# the proxy cannot replay (a POST). Caddy opens one connection per request (no upstream
# keep-alive), so its request follows the connection within microseconds. Without this
# pause, tests/app/test_socket_handover.py (64 clients, two restarts) lost 1-2 POSTs of
# ~9,000 in two runs out of three; with it, none in five.
ACCEPTED_CONNECTION_GRACE_SECONDS = 0.25
SD_LISTEN_FDS_START = 3


class SocketError(Exception):
    """systemd handed over sockets this service cannot use."""


def inherited_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds), or None when started alone."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(env.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)  # not for child processes
    if count == 0:
        return None
    if count != 1:
        raise SocketError(f"systemd passed {count} sockets; digitalme.socket must have "
                          "exactly one ListenStream=")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        raise SocketError("systemd passed a socket that is not a stream socket "
                          "(digitalme.socket needs ListenStream=)")
    sock.setblocking(False)
    return sock


def notify(state: str) -> None:
    """Tell systemd (Type=notify) how the service is doing; nothing when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


async def serve(app: web.Application, listen: tuple[str, int], *, shutdown_timeout: float,
                access_log_format: str) -> None:
    sock = inherited_socket()
    # First: a stop that arrives while the app starts stops it right after, gracefully.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           access_log_format=access_log_format)
    await runner.setup()  # the app's start-up: opens the database, refuses an unmigrated one
    try:
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock, backlog=BACKLOG)
        else:
            site = web.TCPSite(runner, listen[0], listen[1], backlog=BACKLOG)
        await site.start()
        log.info("listening on %s%s", site.name,
                 " (socket passed by systemd)" if sock is not None else "")
        notify("READY=1")
        await stop.wait()
        notify("STOPPING=1")
        log.info("stopping: no new connections; finishing requests in flight")
        await site.stop()
        await asyncio.sleep(ACCEPTED_CONNECTION_GRACE_SECONDS)
    finally:
        await runner.cleanup()
