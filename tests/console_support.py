"""Shared pieces for the console's tests: an agent with the console on, served
on loopback with its model a scripted fake, and a logged-in HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from websockets.asyncio.client import connect

from callbrain.agent import Agent
from callbrain.console.settings import ConsoleSettings
from callbrain.examples.clinic_tools import book_appointment, check_availability
from callbrain.llm.config import OpenAIConfig
from callbrain.records.settings import RecordsSettings
from callbrain.server.app import create_app
from callbrain.server.settings import ServerSettings
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.serve import serve_asgi

TOKEN = "console-token-for-the-tests-0123"
HTML = {"Accept": "text/html"}
SECRETS = {
    "api_key": "sk-test-provider-key-never-shown",
    "socket": "socket-secret-never-shown-4567",
    "webhook": "webhook-key-never-shown-89ab",
    "metrics": "metrics-token-never-shown-cdef",
}


def console_agent(
    fake: FakeOpenAIServer,
    database: Path | str | RecordsSettings | None,
    *,
    console: dict[str, Any] | None = None,
    wait_for_call_details: bool = False,
    **server: Any,
) -> Agent:
    """The clinic's two tools on the fake model, every secret set, the console on."""
    return Agent(
        name="clinic",
        begin_message="Hi {{first_name}}, Sunrise Clinic.",
        dynamic_variables={"first_name": "there"},
        llm=OpenAIConfig(
            provider="openai", base_url=fake.base_url, api_key=SECRETS["api_key"], max_retries=0
        ),
        tools=[check_availability, book_appointment],
        retell_config={"auto_reconnect": True, "call_details": True},
        wait_for_call_details=wait_for_call_details,
        call_details_timeout_s=5,
        server=ServerSettings.model_validate(
            {
                "access": {"secret": SECRETS["socket"]},
                "webhooks": {"api_key": SECRETS["webhook"]},
                "metrics": {"token": SECRETS["metrics"]},
                "records": _records(database),
                "console": ConsoleSettings.model_validate({"token": TOKEN, **(console or {})}),
                **server,
            }
        ),
    )


def _records(database: Path | str | RecordsSettings | None) -> RecordsSettings | bool:
    if database is None:
        return False
    return database if isinstance(database, RecordsSettings) else RecordsSettings(url=str(database))


@dataclass
class Served:
    http: str
    app: Starlette

    @property
    def retell_url(self) -> str:
        """The agent's own route, as Retell is given it."""
        return "ws" + self.http.removeprefix("http") + "/llm-websocket/" + SECRETS["socket"]

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": self.http}

    def socket_url(self, call_id: str, agent: str = "clinic") -> str:
        return "ws" + self.http.removeprefix("http") + f"/console/agents/{agent}/socket/{call_id}"


@contextlib.asynccontextmanager
async def serve_console(agent: Agent) -> AsyncIterator[Served]:
    app = create_app(agent)
    async with serve_asgi(app, settings=agent.server, proxy_headers=False) as http:
        yield Served(http, app)


@contextlib.asynccontextmanager
async def client(served: Served, *, login: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the console, logged in (its cookie jar holds the session)."""
    async with httpx.AsyncClient(base_url=served.http, timeout=10) as http:
        if login:
            answer = await http.post("/console/login", data={"token": TOKEN}, headers=served.origin)
            assert answer.status_code == 303, answer.text
        yield http


@contextlib.asynccontextmanager
async def console(
    tmp_path: Path,
    *replies: Reply,
    records: bool = True,
    database: str | RecordsSettings | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Served, FakeOpenAIServer]]:
    """The console agent served, its model the fake with ``replies``, its records in
    ``database`` (default: a SQLite file in ``tmp_path``; none with ``records=False``)."""
    async with FakeOpenAIServer(*replies, default=Reply("Sure.")) as fake:
        where = (database or tmp_path / "calls.db") if records else None
        async with serve_console(console_agent(fake, where, **options)) as served:
            yield served, fake


@contextlib.asynccontextmanager
async def playground_call(
    served: Served, http: httpx.AsyncClient, call_id: str
) -> AsyncIterator[RetellClient]:
    """The browser's side of a playground call, from Python: the session cookie and
    the console's own origin on the handshake."""
    cookie = "; ".join(f"{name}={value}" for name, value in http.cookies.items())
    headers = {"Cookie": cookie, **served.origin}
    async with connect(served.socket_url(call_id), additional_headers=headers) as ws:
        call = RetellClient(ws)
        try:
            yield call
        finally:
            call._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call._reader


async def recorded(served: Served) -> None:
    """Once the server has finished with every call, and written them."""
    await asyncio.wait_for(served.app.state.runtime.idle.wait(), 10)
    recorder = served.app.state.runtime.recorder
    if recorder is not None:
        await recorder.flush()
