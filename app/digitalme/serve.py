"""Runs the HTTP server: on the listening socket systemd hands over, or on its own.

Under systemd, ``digitalme.socket`` owns the listening socket (``ListenStream=``), so the
socket and its kernel backlog outlive any one process of ``digitalme.service``: while the
service restarts (an upgrade, a rollback, a changed setting), new connections wait in the
backlog and the next process answers them; nothing is refused (docs/operations/upgrades.md).
Without systemd's socket (``scripts/run-local.sh``, tests, a container) the server binds
``DIGITALME_LISTEN`` itself.

A stop (SIGTERM) is graceful, in this order: stop accepting (connections keep arriving in
the backlog, for the next process); wait until every connection already accepted has
delivered its request and every request in flight, streams included, is answered (up to
``SHUTDOWN_GRACE_SECONDS``); only then let aiohttp close the idle connections.
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
# And requests in flight are answered before aiohttp's own shutdown starts: it marks every
# connection closing first, and a closing connection drops the data that still comes, so
# a POST whose body followed its headers late (Caddy sends the headers, then copies the
# body as the client sends it) would hang until the grace ran out and be closed
# unanswered: a 502 (seen once in an end-to-end rollback under load).
# tests/app/test_socket_handover.py restarts the service under 64 clients.
ACCEPTED_CONNECTION_GRACE_SECONDS = 0.05
ACCEPTED_CONNECTION_WAIT_SECONDS = 5.0
ACCEPTED_CONNECTION_POLL_SECONDS = 0.01
# What aiohttp's shutdown still waits for once the requests in flight are answered (or
# the grace is over): a request still running then is cancelled after this.
FINAL_SHUTDOWN_SECONDS = 1.0
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
        raise SocketError(
            f"systemd passed {count} sockets; digitalme.socket must have exactly one ListenStream="
        )
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        raise SocketError(
            "systemd passed a socket that is not a stream socket "
            "(digitalme.socket needs ListenStream=)"
        )
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


async def serve(
    app: web.Application,
    listen: tuple[str, int],
    *,
    shutdown_timeout: float,
    access_log_format: str,
) -> None:
    sock = inherited_socket()
    # First: a stop that arrives while the app starts stops it right after, gracefully.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=FINAL_SHUTDOWN_SECONDS,
        access_log_format=access_log_format,
    )
    await runner.setup()  # the app's start-up: opens the database, refuses an unmigrated one
    try:
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock, backlog=BACKLOG)
        else:
            site = web.TCPSite(runner, listen[0], listen[1], backlog=BACKLOG)
        await site.start()
        log.info(
            "listening on %s%s",
            site.name,
            " (socket passed by systemd)" if sock is not None else "",
        )
        notify("READY=1")
        await stop.wait()
        notify("STOPPING=1")
        log.info("stopping: no new connections; finishing requests in flight")
        await site.stop()
        await _requests_answered(runner, shutdown_timeout)
    finally:
        await runner.cleanup()


def _unanswered(runner: web.AppRunner, waiting_for_requests: bool) -> tuple[int, int]:
    """(connections that have not had a request yet, when still waiting for those;
    connections with a request not answered yet)."""
    server = runner.server
    if server is None:
        return 0, 0
    waiting = busy = 0
    # aiohttp keeps these private: RequestHandler counts the requests it parsed, runs its
    # requests in a task, and waits on a future while it has no request to handle.
    for handler in server.connections:
        task = getattr(handler, "_task_handler", None)
        if task is None or task.done():
            continue  # closed, or closing
        idle = getattr(handler, "_waiter", None)
        if getattr(handler, "_request_count", 1) == 0:
            waiting += waiting_for_requests
        elif idle is None or idle.done() or getattr(handler, "_messages", None):
            busy += 1
    return waiting, busy


async def _requests_answered(runner: web.AppRunner, grace: float) -> None:
    """Wait until every connection accepted before the stop has had its request (at most
    ACCEPTED_CONNECTION_WAIT_SECONDS: a client may connect and send nothing) and every
    request is answered, streams included (at most ``grace`` seconds in all)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(ACCEPTED_CONNECTION_GRACE_SECONDS)
    waiting_for_requests = True
    while True:
        now = loop.time()
        waiting, busy = _unanswered(runner, waiting_for_requests)
        if not waiting and not busy:
            return
        if waiting and now >= started + ACCEPTED_CONNECTION_WAIT_SECONDS:
            log.warning(
                "stopping: %d connection(s) sent no request in %.0f s; closing them",
                waiting,
                ACCEPTED_CONNECTION_WAIT_SECONDS,
            )
            waiting_for_requests = False
            continue
        if now >= started + grace:
            log.warning(
                "stopping: %d request(s) still running after %.0f s; cancelling them", busy, grace
            )
            return
        await asyncio.sleep(ACCEPTED_CONNECTION_POLL_SECONDS)
