"""Several agents in one app: each at its own URL with its own tools and model,
sharing the process-wide settings, the store, ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from support import agent_on
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent, AgentConfigError
from callbrain.server.app import create_app, retell_path
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply
from callbrain.testing.serve import serve_asgi
from callbrain.tools import tool

SECRET = "multi-agent-secret-0123456789"


@tool
def menu() -> list[str]:
    """What is on the menu."""
    return ["margherita", "marinara"]


@tool
def rolls() -> list[str]:
    """Which rolls there are."""
    return ["salmon", "tuna"]


def pizza(fake: FakeOpenAIServer, **fields: Any) -> Agent:
    return agent_on(fake, name="pizza", begin_message="Pizza here.", tools=[menu], **fields)


def sushi(fake: FakeOpenAIServer, **fields: Any) -> Agent:
    return agent_on(fake, name="sushi", begin_message="Sushi here.", tools=[rolls], **fields)


@contextlib.asynccontextmanager
async def serving(*agents: Agent) -> AsyncIterator[tuple[str, str, Starlette]]:
    """The app on loopback: its HTTP base, its WebSocket base (no prefix) and the app."""
    app = create_app(list(agents))
    async with serve_asgi(app, settings=agents[0].server) as http:
        yield http, "ws" + http.removeprefix("http"), app


async def status_of(url: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=5):
            pass
    return refused.value.response.status_code


async def test_each_agent_answers_at_its_own_url_with_its_own_tools_and_model() -> None:
    async with (
        FakeOpenAIServer(Reply("", tool_calls=[FakeToolCall("menu")]), Reply("Margherita.")) as a,
        FakeOpenAIServer(Reply("", tool_calls=[FakeToolCall("rolls")]), Reply("Salmon.")) as b,
        serving(pizza(a), sushi(b)) as (http, ws, _),
    ):
        for name, greeting, answer in [("pizza", "Pizza here.", "Margherita."),
                                       ("sushi", "Sushi here.", "Salmon.")]:  # fmt: skip
            async with RetellClient.connect(ws + retell_path("/llm-websocket", name), "c1") as call:
                await call.expect_config()
                assert (await call.expect_begin()).text == greeting
                assert (await call.ask("What do you have?")).text.endswith(answer)
        # Each model saw its own agent's tools only.
        assert [t["function"]["name"] for t in a.requests[0].body["tools"]] == ["menu"]
        assert [t["function"]["name"] for t in b.requests[0].body["tools"]] == ["rolls"]
        health = (await httpx.AsyncClient().get(http + "/healthz")).json()
        assert health == {
            "status": "ok",
            "pid": os.getpid(),
            "active_calls": 0,
            "agents": {"pizza": {"active_calls": 0}, "sushi": {"active_calls": 0}},
        }


async def test_the_short_url_is_for_one_agent_only_and_a_wrong_name_is_a_404(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callbrain.server.access")
    async with FakeOpenAIServer() as fake:
        async with serving(pizza(fake)) as (_, ws, _app):
            async with RetellClient.connect(ws + "/llm-websocket", "c1") as call:
                await call.expect_config()  # one agent: today's URL
            async with RetellClient.connect(ws + "/llm-websocket/agent/pizza", "c2") as call:
                await call.expect_config()  # and its own
        async with serving(pizza(fake), sushi(fake)) as (_, ws, _app):
            assert await status_of(ws + "/llm-websocket/c3") == 404
            assert await status_of(ws + "/llm-websocket/agent/pasta/c4") == 404
    logged = [r.getMessage() for r in caplog.records]
    # uvicorn takes the 404 as the end of the handshake, not as an app that failed.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], logged
    assert any(
        "no call socket at this path (calls go to /llm-websocket/agent/pizza/{call_id} or "
        "/llm-websocket/agent/sushi/{call_id})" in m
        for m in logged
    )
    assert any("no agent of that name here (agents: pizza, sushi)" in m for m in logged)


async def test_the_secret_goes_after_the_agent_name() -> None:
    server = {"access": {"secret": SECRET}}
    async with (
        FakeOpenAIServer() as fake,
        serving(pizza(fake, server=server), sushi(fake)) as (_, ws, _app),
    ):
        base = ws + retell_path("/llm-websocket", "sushi")
        assert retell_path("/llm-websocket", "sushi", secret=True).endswith("/sushi/<secret>")
        async with RetellClient.connect(f"{base}/{SECRET}", "c1") as call:
            await call.expect_config()
        async with RetellClient.connect(f"{base}?token={SECRET}", "c2") as call:
            await call.expect_config()
        assert await status_of(f"{base}/c3") == 403
        assert await status_of(f"{base}/wrong-secret/c4") == 403


async def test_max_calls_counts_every_agents_calls() -> None:
    server = {"access": {"max_calls": 1}}
    async with (
        FakeOpenAIServer() as fake,
        serving(pizza(fake, server=server), sushi(fake)) as (_, ws, _app),
        RetellClient.connect(ws + "/llm-websocket/agent/pizza", "c1") as call,
    ):
        await call.expect_config()
        assert await status_of(ws + "/llm-websocket/agent/sushi/c2") == 403


async def test_metrics_sum_the_agents_and_know_all_their_tools() -> None:
    async with (
        FakeOpenAIServer(Reply("", tool_calls=[FakeToolCall("menu")]), Reply("Ok.")) as a,
        FakeOpenAIServer(Reply("", tool_calls=[FakeToolCall("rolls")]), Reply("Ok.")) as b,
        serving(pizza(a), sushi(b)) as (http, ws, _),
    ):
        for name in ("pizza", "sushi"):
            async with RetellClient.connect(ws + f"/llm-websocket/agent/{name}", name) as call:
                await call.expect_config()
                await call.expect_begin()
                await call.ask("Anything?")
        assert await status_of(ws + "/nowhere/c9") == 404
        async with httpx.AsyncClient() as client:
            text = (await client.get(http + "/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("callbrain_calls_total", ())] == 2
    assert samples[("callbrain_tool_calls_total", (("outcome", "ok"), ("tool", "menu")))] == 1
    assert samples[("callbrain_tool_calls_total", (("outcome", "ok"), ("tool", "rolls")))] == 1
    assert samples[("callbrain_sockets_refused_total", (("reason", "path"),))] == 1


async def test_server_blocks_combine_or_conflict_by_name() -> None:
    async with FakeOpenAIServer() as fake:
        same = {"access": {"secret": SECRET}}
        create_app([pizza(fake, server=same), sushi(fake, server=same)])  # repeated: fine
        create_app([pizza(fake, server=same), sushi(fake)])  # left out: the first one's
        with pytest.raises(AgentConfigError) as conflict:
            create_app([pizza(fake, server=same), sushi(fake, server={"drain_s": 5})])
        message = str(conflict.value)
        assert "server.access.secret, server.drain_s differs from agent 'pizza'" in message
        assert SECRET not in message
        with pytest.raises(AgentConfigError, match="another agent is also named 'pizza'"):
            create_app([pizza(fake), pizza(fake)])


async def test_a_drain_covers_every_agent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="callbrain.server.access")
    async with (
        FakeOpenAIServer() as fake,
        serving(pizza(fake), sushi(fake)) as (http, ws, app),
        RetellClient.connect(ws + "/llm-websocket/agent/sushi", "c1") as call,
    ):
        await call.expect_config()
        drains = [asyncio.create_task(r.drain(60)) for r in app.state.runtimes]
        async with httpx.AsyncClient() as client:
            assert (await client.get(http + "/healthz")).status_code == 503
        assert await status_of(ws + "/llm-websocket/agent/pizza/c2") == 403
        await call.close()
        assert await asyncio.gather(*drains) == [0, 0]
    assert any(r.getMessage().endswith(": the server is shutting down") for r in caplog.records)
