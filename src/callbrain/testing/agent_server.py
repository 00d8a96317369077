"""Serve an agent on loopback for a test, in the current event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from callbrain.agent import Agent
from callbrain.call.control import CallHook
from callbrain.llm.base import LLM
from callbrain.server.app import DEFAULT_PREFIX, create_app
from callbrain.testing.serve import serve_asgi


@contextlib.asynccontextmanager
async def serve_agent(
    agent: Agent,
    *,
    llm: LLM | None = None,
    prefix: str = DEFAULT_PREFIX,
    on_call_start: CallHook | None = None,
) -> AsyncIterator[str]:
    """Run ``create_app(agent)`` on a free port; yields the WebSocket base URL for Retell.

    The URL is what you would paste into Retell, e.g. ``ws://127.0.0.1:PORT/llm-websocket``;
    pass it to :meth:`callbrain.testing.RetellClient.connect`.
    """
    app = create_app(agent, prefix=prefix, llm=llm, on_call_start=on_call_start)
    for runtime in app.state.runtimes:
        # The store and the model, as `callbrain serve` starts them: a StartupError
        # saying which, rather than uvicorn's traceback of a failed lifespan.
        await runtime.start()
    async with serve_asgi(app, settings=agent.server) as http_url:
        yield "ws" + http_url.removeprefix("http") + "/" + prefix.strip("/")
