"""A call whose brain is Anthropic: the real SDK against the fake messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support import llm_config

from callbrain.agent import Agent, example_agent_path
from callbrain.testing import FakeAnthropicServer, Reply, RetellClient, serve_agent


@pytest.fixture
async def call() -> AsyncIterator[tuple[RetellClient, FakeAnthropicServer]]:
    async with FakeAnthropicServer() as fake:
        agent = Agent.from_yaml(example_agent_path()).model_copy(
            update={
                "wait_for_call_details": False,
                "llm": llm_config(fake, model="claude-test", max_tokens=300),
            }
        )
        async with serve_agent(agent) as url, RetellClient.connect(url) as client:
            await client.expect_config()
            await client.expect_begin()
            yield client, fake


async def test_reply_streams_with_system_prompt_apart(
    call: tuple[RetellClient, FakeAnthropicServer],
) -> None:
    client, fake = call
    fake.script(Reply("We open at eight on Monday."))
    turn = await client.ask("When do you open on Monday?")
    assert turn.text == "We open at eight on Monday." and turn.completes == 1
    body = fake.requests[0].body
    assert body["system"].startswith("You are Ava, the receptionist at Sunrise Clinic")
    assert body["max_tokens"] == 300
    # The call opened with the agent's greeting: a placeholder user turn comes first.
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert body["messages"][1]["content"].startswith("Hi there, thanks for calling")


async def test_interruption_closes_the_anthropic_stream(
    call: tuple[RetellClient, FakeAnthropicServer],
) -> None:
    client, fake = call
    fake.script(Reply(["Let me ", "look..."], chunk_delay=30), Reply("Tuesday at ten."))
    old = await client.say("Can I book")
    await client.wait_for(lambda _: bool(client.response_turn(old).frames))
    new = await client.say("Can I book Tuesday?")
    await fake.wait_for_outcome(0, "client_disconnected", timeout=3)
    assert (await client.response(new)).text == "Tuesday at ten."
    await client.ping()
    assert client.response_turn(old).completes == 0


async def test_overloaded_provider_gets_the_fallback_line(
    call: tuple[RetellClient, FakeAnthropicServer],
) -> None:
    client, fake = call
    fake.script(Reply(status=529))
    turn = await client.ask("Hello?")
    assert turn.text == "Sorry, I didn't catch that properly. Could you say it again?"
    assert turn.completes == 1
