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
# keep-alive), so its request follows the connection at once, but on a starved machine
# "at once" can be later than a fixed pause: a fixed 0.25 s lost 1 POST in about 20,000 in
# two end-to-end upgrades at load average ~10. So the stopping process waits until every
# connection it accepted has had a request (the shortest wait first, then polling), at most
# ACCEPTED_CONNECTION_WAIT_SECONDS (a client that connects and sends nothing).
# tests/app/test_socket_handover.py restarts the service under 64 clients.
ACCEPTED_CONNECTION_GRACE_SECONDS = 0.05
ACCEPTED_CONNECTION_WAIT_SECONDS = 5.0
ACCEPTED_CONNECTION_POLL_SECONDS = 0.01
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
        await _requests_of_accepted_connections(runner)
    finally:
        await runner.cleanup()


def _waiting_for_a_request(runner: web.AppRunner) -> int:
    """How many of the open connections have not had a request yet."""
    server = runner.server
    if server is None:
        return 0
    # RequestHandler counts the requests it parsed; aiohttp keeps the count private.
    return sum(1 for handler in server.connections if getattr(handler, "_request_count", 1) == 0)


async def _requests_of_accepted_connections(runner: web.AppRunner) -> None:
    """Wait until every connection accepted before the stop has had its request (they are
    then finished by the runner's graceful shutdown), at most
    ACCEPTED_CONNECTION_WAIT_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ACCEPTED_CONNECTION_WAIT_SECONDS
    await asyncio.sleep(ACCEPTED_CONNECTION_GRACE_SECONDS)
    while True:
        waiting = _waiting_for_a_request(runner)
        if not waiting:
            return
        if loop.time() >= deadline:
            log.warning("stopping: %d connection(s) sent no request in %.0f s; closing them",
                        waiting, ACCEPTED_CONNECTION_WAIT_SECONDS)
            return
        await asyncio.sleep(ACCEPTED_CONNECTION_POLL_SECONDS)
