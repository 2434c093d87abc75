"""Serve an ASGI app with uvicorn and say where once the socket listens (port 0: any free port)."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn


def serve(app, *, host: str, port: int, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; `on_ready(url)` runs once, with the port actually bound."""

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                on_ready(f"http://{shown}:{bound[1]}")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    Server(config).run()
