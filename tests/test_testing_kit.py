"""The testing kit as users see it, starting with the example in docs/testing.md."""

from __future__ import annotations

from callbrain import Agent
from callbrain.agent import example_agent_path
from callbrain.llm import OpenAIConfig
from callbrain.testing import FakeOpenAIServer, Reply, RetellClient, serve_agent


async def test_readme_example() -> None:
    async with FakeOpenAIServer(Reply("We open at eight.", ttft=0.2)) as fake:
        agent = Agent.from_yaml(example_agent_path()).model_copy(
            update={
                "llm": OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="test"),
            }
        )
        async with serve_agent(agent) as url, RetellClient.connect(url) as call:
            await call.expect_config()
            await call.expect_begin()
            reply = await call.ask("When do you open?")
            assert reply.text == "We open at eight." and reply.completes == 1
            assert fake.requests[0].body["messages"][-1]["content"] == "When do you open?"


async def test_client_keeps_the_transcript_like_retell() -> None:
    async with FakeOpenAIServer(Reply("Hello!"), Reply("Bye!")) as fake:
        agent = Agent(
            begin_message="Hi.",
            llm=OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="t"),
        )
        async with serve_agent(agent) as url, RetellClient.connect(url, "abc") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hey")
            await call.ask("Goodbye")
            assert call.transcript == [
                {"role": "agent", "content": "Hi."},
                {"role": "user", "content": "Hey"},
                {"role": "agent", "content": "Hello!"},
                {"role": "user", "content": "Goodbye"},
                {"role": "agent", "content": "Bye!"},
            ]
            # What the server sent the model matches what the client says Retell heard.
            assert [m["content"] for m in fake.requests[1].body["messages"][1:]] == [
                "Hi.",
                "Hey",
                "Hello!",
                "Goodbye",
            ]
            assert call.latest_response_id == 2


async def test_a_long_running_client_can_forget_what_it_kept() -> None:
    async with FakeOpenAIServer(Reply("Hello!"), Reply("Bye!")) as fake:
        agent = Agent(
            begin_message="Hi.",
            llm=OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="t"),
        )
        async with (
            serve_agent(agent) as url,
            RetellClient.connect(url, "abc", keep_sent=False) as call,
        ):
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hey")
            call.forget_frames()
            assert call.frames == [] and call.received_at == []
            rid = await call.say("Goodbye")
            frame = await call.next_frame()  # the cursor starts over with new frames
            assert frame["response_id"] == rid
            assert (await call.response(rid)).text == "Bye!"
            assert call.sent == []
            # The checker saw everything, forgotten or not.
            assert call.checker.turns[1].text == "Hello!" and call.checker.violations == []
