"""Serve an ASGI app with uvicorn and say where once the socket listens (port 0: any free port)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from serving.banner import local_url
from serving.errors import ServingError


@contextlib.contextmanager
def listening(host: str, port: int) -> Iterator[socket.socket]:
    """The server's socket, bound before its model loads: a port in use (or an address this machine
    does not have) is an error at once, not after minutes of loading, and nothing can take the port
    in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        hint = (
            ": another server is listening there; stop it, or pick another port (--port, SERVE_PORT)"
            if e.errno == errno.EADDRINUSE
            else ""
        )
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ServingError(f"cannot listen on {host}:{port} ({reason}){hint}") from None
    with sock:
        yield sock


def serve(
    build_app: Callable[[], Any], *, host: str, port: int, on_ready: Callable[[str], None] | None = None
) -> None:
    """Bind host:port, then build the app (which loads the model) and serve it until interrupted;
    `on_ready(url)` runs once, with where this machine reaches the server: the port actually bound (port
    0: any free one), and the loopback address for a wildcard one.

    SIGTERM (`docker compose stop`, a supervisor) is a clean stop: uvicorn finishes the requests in
    flight and shuts down, and the process then exits 0.
    """

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = self.servers[0].sockets[0].getsockname()
                on_ready(local_url(bound[0], bound[1]))

    with listening(host, port) as sock:
        config = uvicorn.Config(build_app(), log_level="warning", access_log=False)
        with _sigterm_exits_cleanly():
            Server(config).run(sockets=[sock])


@contextlib.contextmanager
def _sigterm_exits_cleanly() -> Iterator[None]:
    """After its graceful shutdown uvicorn raises the signal again for the handler that was there
    before it, so that the process ends the way that signal ends it: for SIGTERM by default a death
    by signal, status 143, which compose and supervisors record as a failure. This handler makes it
    exit 0 instead."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(_signum: int, _frame) -> None:
    raise SystemExit(0)
