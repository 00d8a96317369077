"""The ASGI app: routes, health, mounting, and failing safely."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest
from fastapi import FastAPI
from support import agent_on
from websockets.asyncio.client import connect

from callbrain import create_app
from callbrain.agent import Agent, AgentConfigError
from callbrain.llm import ChatRequest, TextDelta
from callbrain.llm.config import LocalConfig, OpenAIConfig
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
            "pid": os.getpid(),  # which process answered, when several workers serve
            "agent": "srv",
            "active_calls": 0,
            "agents": {"srv": {"active_calls": 0}},
        }
        ws = "ws" + http.removeprefix("http") + "/llm-websocket"
        async with RetellClient.connect(ws, "c1") as call:
            await call.expect_config()
            await call.expect_begin()
            health = await get_json(http + "/healthz")
            assert health["active_calls"] == 1


async def test_custom_prefix_and_mounting_in_fastapi() -> None:
    async with FakeOpenAIServer(Reply("Mounted and working.")) as fake:
        retell = create_app(agent_for(fake), prefix="/brain")
        # A parent does not run a mounted app's lifespan: run it from the parent's
        # (as the app's docstring says), so the model loads and closes with the server.
        api = FastAPI(lifespan=lambda _: retell.router.lifespan_context(retell))
        api.mount("/retell", retell)
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


async def test_a_model_that_cannot_start_closes_with_1011_not_1000(tmp_path: Path) -> None:
    # Not a GGUF file: the model client is built, but loading it on the first call fails.
    # Mounted, so the parent does not run the lifespan that would load it at start-up.
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    agent = Agent(llm=LocalConfig(provider="local", model_path=str(bogus)))
    api = FastAPI()
    api.mount("/x", create_app(agent))
    async with serve_asgi(api) as http:
        url = "ws" + http.removeprefix("http") + "/x/llm-websocket"
        async with RetellClient.connect(url, "c") as call:
            await call.wait_for(lambda _: call.closed, timeout=15)
        assert call.close_code == 1011
        assert call.frames == []


def test_a_missing_api_key_fails_create_app_with_the_variable_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(AgentConfigError, match=r"llm: .*OPENAI_API_KEY environment variable"):
        create_app(Agent(llm=OpenAIConfig(provider="openai")))


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
