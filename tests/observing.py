"""Shared pieces for the metrics and tracing tests: a served app and a probe that
says when the server has finished with a call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette

from callbrain.agent import Agent
from callbrain.call.record import CallRecord, TurnRecord
from callbrain.server.app import create_app
from callbrain.testing.serve import serve_asgi


@dataclass
class CallsEnded:
    """An observer that counts the calls the server has finished with.

    ``create_app`` puts its own observers first, so once this one hears of the
    end of a call the metrics and traces have taken it in.
    """

    ended: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def call_started(self, call: CallRecord) -> None:
        pass

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def call_ended(self, call: CallRecord) -> None:
        self.ended += 1
        self.changed.set()

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.ended < count:
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Served:
    http: str
    ws: str
    app: Starlette
    probe: CallsEnded


@contextlib.asynccontextmanager
async def serve(agent: Agent, **options: Any) -> AsyncIterator[Served]:
    """``create_app(agent)`` on loopback, as ``callbrain serve`` runs it (no proxy
    headers from uvicorn: the app's own ``trusted_proxies`` decides)."""
    probe = CallsEnded()
    app = create_app(agent, observers=[probe], **options)
    async with serve_asgi(app, proxy_headers=False) as http:
        yield Served(http, "ws" + http.removeprefix("http") + "/llm-websocket", app, probe)
