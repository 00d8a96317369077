"""Run any ASGI app on a loopback port inside the current event loop.

Tests and benchmarks need real sockets (a real WebSocket handshake, a real
HTTP stream the provider SDK must parse) without the cost and flakiness of a
subprocess. uvicorn can serve on a socket we bind ourselves, so port 0 gives a
free port with no race.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from callbrain.server.process import listening_socket, uvicorn_config
from callbrain.server.settings import ServerSettings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for a server started as a process
    (in-process servers bind port 0 themselves and have no race)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServerSettings | None = None,
    **uvicorn_options: Any,
) -> AsyncIterator[str]:
    """Serve ``app`` until the block exits; yields its base URL, ``http://host:port``.

    uvicorn runs with the settings ``callbrain serve`` uses
    (:func:`~callbrain.server.process.uvicorn_config`), quieter and quicker to stop.
    """
    sock = listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "log_level": "warning",
        "timeout_graceful_shutdown": 2,
        **uvicorn_options,
    }
    config = uvicorn_config(app, host=host, port=bound_port, settings=settings, **options)
    server = uvicorn.Server(config)
    # serve() takes over SIGINT/SIGTERM while it runs; a helper embedded in
    # someone else's process (a test run, a bench) must leave them alone.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    async def serve() -> None:
        # uvicorn reports a failed startup (the lifespan raised) as SystemExit, which
        # asyncio would re-raise out of the whole event loop: keep it in this task.
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:
            raise RuntimeError("the ASGI app failed to start; its error is logged above") from exc

    task = asyncio.create_task(serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await task
        sock.close()
