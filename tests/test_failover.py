"""Failover between providers, through a real call: what the caller hears, and
which fake provider was asked. Faults come from the fake servers (HTTP errors,
stalls, dropped streams) and from a port nobody listens on."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from callbrain.agent import Agent
from callbrain.llm import create_llm
from callbrain.llm.config import AnthropicConfig, OpenAIConfig
from callbrain.llm.failover import FailoverLLM
from callbrain.testing import (
    FakeAnthropicServer,
    FakeOpenAIServer,
    Reply,
    RetellClient,
    serve_agent,
)

FALLBACK = "Sorry, say that again?"


def openai(fake_or_url: FakeOpenAIServer | str, **options: Any) -> OpenAIConfig:
    url = fake_or_url if isinstance(fake_or_url, str) else fake_or_url.base_url
    return OpenAIConfig(
        provider="openai", base_url=url, api_key="k", **{"max_retries": 0, **options}
    )


def anthropic(fake: FakeAnthropicServer, **options: Any) -> AnthropicConfig:
    settings = {"max_retries": 0, **options}
    return AnthropicConfig(provider="anthropic", base_url=fake.base_url, api_key="k", **settings)


def agent(primary: Any, *fallbacks: Any, **options: Any) -> Agent:
    fields = {"begin_message": "Hello.", "fallback_message": FALLBACK, **options}
    return Agent(name="failover", llm=primary, fallback_llms=list(fallbacks), **fields)


async def ask(agent: Agent, *lines: str, llm: Any = None) -> list[str]:
    async with serve_agent(agent, llm=llm) as url, RetellClient.connect(url) as call:
        await call.expect_config()
        await call.expect_begin()
        texts = []
        for line in lines:
            turn = await call.ask(line)
            assert turn.completes == 1
            texts.append(turn.text)
        assert call.checker.violations == []
        return texts


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def test_a_server_error_moves_the_turn_to_the_next_provider() -> None:
    async with (
        FakeOpenAIServer(Reply(status=500)) as first,
        FakeAnthropicServer(Reply("Anthropic here.")) as second,
    ):
        assert await ask(agent(openai(first), anthropic(second)), "Hi") == ["Anthropic here."]
        assert len(first.requests) == 1 and len(second.requests) == 1


async def test_rate_limits_and_refused_connections_fail_over_too() -> None:
    async with (
        FakeOpenAIServer(Reply(status=429)) as limited,
        FakeOpenAIServer(Reply("Third time lucky.")) as working,
    ):
        chain = agent(openai(closed_port()), openai(limited), openai(working))
        assert await ask(chain, "Hi") == ["Third time lucky."]
        assert len(limited.requests) == 1


async def test_a_missed_first_token_deadline_fails_over_and_the_caller_hears_a_filler() -> None:
    async with (
        FakeOpenAIServer(Reply("Too late.", ttft=30)) as slow,
        FakeOpenAIServer(Reply("Here you go.")) as quick,
    ):
        chain = agent(
            openai(slow, first_token_timeout_s=0.5),
            openai(quick),
            first_token_filler_after_s=0.1,
            first_token_filler_message="One moment.",
        )
        assert await ask(chain, "Hi") == ["One moment. Here you go."]
        await slow.wait_for_outcome(0, "client_disconnected")


async def test_after_the_first_words_a_failure_is_never_retried_elsewhere() -> None:
    # The caller already heard "We open"; a second provider would start over.
    async with (
        FakeOpenAIServer(Reply("We open at nine.", drop_after=2)) as first,
        FakeOpenAIServer(Reply("We open at nine.")) as second,
    ):
        [text] = await ask(agent(openai(first), openai(second)), "When do you open?")
        assert text == "We open " + FALLBACK
        assert second.requests == []


async def test_a_request_error_is_not_failed_over() -> None:
    # A 400 is a request we built wrong: another provider would not fix it.
    async with (
        FakeOpenAIServer(Reply(status=400)) as first,
        FakeOpenAIServer(Reply("Unreached.")) as second,
    ):
        assert await ask(agent(openai(first), openai(second)), "Hi") == [FALLBACK]
        assert second.requests == []


async def test_a_provider_that_keeps_failing_leaves_the_rotation_until_a_probe_succeeds() -> None:
    down = Reply(status=503)
    async with (
        FakeOpenAIServer(down, down, down, down, default=Reply("Primary.")) as first,
        FakeOpenAIServer(default=Reply("Secondary.")) as second,
    ):
        members = [create_llm(openai(first)), create_llm(openai(second))]
        llm = FailoverLLM(members, failure_threshold=2, probe_interval_s=0.05)
        try:
            texts = await ask(agent(openai(first)), "one", "two", "three", llm=llm)
            assert texts == ["Secondary.", "Secondary.", "Secondary."]
            # Two failed turns took it out; the third turn did not even try it.
            asked = [r.body["messages"][-1]["content"] for r in first.requests]
            assert asked[:2] == ["one", "two"] and "three" not in asked
            # The probes get the remaining errors, then an answer: back in rotation.
            async with asyncio.timeout(5):
                while llm.rotation()[0] is not members[0]:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.01)
            probes = [r for r in first.requests if r.body["messages"][-1]["content"] == "ping"]
            assert probes and probes[-1].outcome == "completed"
            assert await ask(agent(openai(first)), "four", llm=llm) == ["Primary."]
        finally:
            await llm.aclose()


async def test_one_provider_is_never_taken_out() -> None:
    async with FakeOpenAIServer(default=Reply(status=503)) as only:
        llm = FailoverLLM([create_llm(openai(only))], failure_threshold=1)
        try:
            assert await ask(agent(openai(only)), "a", "b", llm=llm) == [FALLBACK, FALLBACK]
            assert len(only.requests) == 2 and llm.rotation() == llm.llms
        finally:
            await llm.aclose()


# -------------------------------------------- retries: the next provider comes first


async def test_a_rate_limit_with_a_long_retry_after_fails_over_at_once() -> None:
    # With a provider after it, waiting out Retry-After (and then retrying) would
    # keep the caller in silence: the next provider answers instead.
    async with (
        FakeOpenAIServer(Reply(status=429, retry_after=3), default=Reply("Primary.")) as first,
        FakeAnthropicServer(Reply(status=429, retry_after=3), default=Reply("Second.")) as second,
        FakeOpenAIServer(default=Reply("Third.")) as third,
    ):
        patient = {"max_retries": 2, "first_token_timeout_s": 30}
        chain = agent(openai(first, **patient), anthropic(second, **patient), openai(third))
        assert await ask(chain, "Hi") == ["Third."]
        assert len(first.requests) == len(second.requests) == len(third.requests) == 1


async def test_the_last_provider_in_rotation_still_retries() -> None:
    async with (
        FakeOpenAIServer(Reply(status=500), default=Reply("Primary.")) as first,
        FakeAnthropicServer(Reply(status=429), default=Reply("Worth the wait.")) as last,
    ):
        chain = agent(openai(first, max_retries=1), anthropic(last, max_retries=1))
        assert await ask(chain, "Hi") == ["Worth the wait."]
        assert [r.outcome for r in first.requests] == ["error_status"]
        assert [r.outcome for r in last.requests] == ["error_status", "completed"]


async def test_a_provider_left_alone_in_rotation_uses_its_retries() -> None:
    # Once the backup is out of rotation the primary is the last one tried, and
    # a 429 is then worth the SDK's retry.
    fail, limited = Reply(status=500), Reply(status=429)
    async with (
        FakeOpenAIServer(
            fail, Reply("Primary."), fail, limited, default=Reply("Retried.")
        ) as first,
        FakeOpenAIServer(Reply(status=503), Reply(status=503), default=Reply("Backup.")) as second,
    ):
        members = [create_llm(openai(first, max_retries=1)), create_llm(openai(second))]
        llm = FailoverLLM(members, failure_threshold=2, probe_interval_s=3600)
        try:
            # The primary never fails twice in a row; the backup does, in turn three.
            texts = await ask(agent(openai(first)), "one", "two", "three", "four", llm=llm)
            assert texts == [FALLBACK, "Primary.", FALLBACK, "Retried."]
            assert llm.rotation() == [members[0]]
            assert [r.outcome for r in first.requests].count("error_status") == 3
            assert len(second.requests) == 2
        finally:
            await llm.aclose()
