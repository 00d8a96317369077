"""The ASGI app: routes, health, mounting, and failing safely."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from fastapi import FastAPI
from support import agent_on
from websockets.asyncio.client import connect

from callbrain import create_app
from callbrain.agent import Agent
from callbrain.llm import ChatRequest, TextDelta
from callbrain.llm.config import OpenAIConfig
from callbrain.llm.openai import OpenAILLM
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.serve import serve_asgi


def agent_for(fake: FakeOpenAIServer, **llm: object) -> Agent:
    return agent_on(fake, name="srv", begin_message="Hi.", llm=llm)


async def get_json(url: str) -> dict[str, object]:
    def fetch() -> dict[str, object]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    return await asyncio.to_thread(fetch)


async def test_healthz_counts_active_calls() -> None:
    async with FakeOpenAIServer() as fake, serve_asgi(create_app(agent_for(fake))) as http:
        assert await get_json(http + "/healthz") == {
            "status": "ok",
            "agent": "srv",
            "active_calls": 0,
        }
        ws = "ws" + http.removeprefix("http") + "/llm-websocket"
        async with RetellClient.connect(ws, "c1") as call:
            await call.expect_config()
            await call.expect_begin()
            health = await get_json(http + "/healthz")
            assert health["active_calls"] == 1


async def test_custom_prefix_and_mounting_in_fastapi() -> None:
    async with FakeOpenAIServer(Reply("Mounted and working.")) as fake:
        api = FastAPI()
        api.mount("/retell", create_app(agent_for(fake), prefix="/brain"))
        async with serve_asgi(api) as http:
            base = "ws" + http.removeprefix("http") + "/retell/brain"
            async with RetellClient.connect(base, "call-42") as call:
                await call.expect_config()
                await call.expect_begin()
                turn = await call.ask("Hello?")
                assert turn.text == "Mounted and working."


async def test_the_call_id_path_segment_is_required() -> None:
    async with FakeOpenAIServer() as fake, serve_agent(agent_for(fake)) as url:
        with pytest.raises(Exception, match=r"403|404"):
            async with connect(url, open_timeout=3):
                pass


async def test_a_model_that_cannot_start_closes_with_1011_not_1000(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    # Mounted, so the parent does not run the lifespan that would refuse to start:
    # the model is built on the first call, and fails there.
    agent = Agent(llm=OpenAIConfig(provider="openai"))
    api = FastAPI()
    api.mount("/x", create_app(agent))
    async with serve_asgi(api) as http:
        url = "ws" + http.removeprefix("http") + "/x/llm-websocket"
        async with RetellClient.connect(url, "c") as call:
            await call.wait_for(lambda _: call.closed, timeout=5)
        assert call.close_code == 1011
        assert call.frames == []


async def test_startup_fails_loudly_without_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    app = create_app(Agent(llm=OpenAIConfig(provider="openai")))
    with pytest.raises(RuntimeError, match="failed to start"):
        async with serve_asgi(app):
            pass


async def test_a_model_passed_in_is_shared_and_left_open() -> None:
    async with FakeOpenAIServer(Reply("From the shared client."), Reply("Still open.")) as fake:
        agent = agent_for(fake)
        shared = OpenAILLM(agent.llm)  # type: ignore[arg-type]
        try:
            async with serve_agent(agent, llm=shared) as url, RetellClient.connect(url) as call:
                await call.expect_config()
                await call.expect_begin()
                assert (await call.ask("Hi")).text == "From the shared client."
            # The app has shut down; the client it was given still belongs to us.
            async with shared.chat(ChatRequest(system="", messages=())) as stream:
                text = [c.text async for c in stream if isinstance(c, TextDelta)]
            assert "".join(text) == "Still open."
        finally:
            await shared.aclose()
