"""Choosing replies per request, serving without recording, and the reply mix
behind ``callbrain fake-llm``, in-process."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from callbrain.testing.fake_llm import FakeAnthropicServer, FakeOpenAIServer, Reply
from callbrain.testing.fake_llm.base import JSONObject
from callbrain.testing.fake_llm.mix import ReplyMix, ReplyMixError

CHAT = {"model": "m-1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=5) as client:
        yield client


def streamed_text(raw: str) -> str:
    """The content of an OpenAI SSE body."""
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def chat(content: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": content}]}


async def test_a_reply_function_answers_once_the_script_is_out(http: httpx2.AsyncClient) -> None:
    bodies: list[JSONObject] = []

    def echo(body: JSONObject) -> Reply:
        bodies.append(body)
        return Reply(f"You said: {body['messages'][-1]['content']}")

    async with FakeOpenAIServer(Reply("Scripted."), default=echo) as fake:
        texts = []
        for said in ("one", "two", "three"):
            response = await http.post(f"{fake.base_url}/chat/completions", json=chat(said))
            texts.append(streamed_text(response.text))
        fake.reset(default=lambda body: Reply("After reset."))
        response = await http.post(f"{fake.base_url}/chat/completions", json=CHAT)
    assert texts == ["Scripted.", "You said: two", "You said: three"]
    assert [b["messages"][0]["content"] for b in bodies] == ["two", "three"]  # called once each
    assert streamed_text(response.text) == "After reset."
    assert [r.reply.full_text for r in fake.requests] == ["After reset."]


async def test_record_false_keeps_nothing_but_counts(http: httpx2.AsyncClient) -> None:
    async with FakeOpenAIServer(Reply(status=503), default=Reply("Ok."), record=False) as fake:
        responses = [
            await http.post(f"{fake.base_url}/chat/completions", json=CHAT) for _ in range(3)
        ]
        await fake.wait_until(lambda: fake.outcomes["completed"] == 2)
    assert [r.status_code for r in responses] == [503, 200, 200]
    assert fake.requests == []
    assert fake.received == 3
    assert fake.outcomes == Counter(error_status=1, completed=2)
    # Request ids stay unique without the recording to count them.
    assert [r.headers["x-request-id"] for r in responses] == ["req_fake0", "req_fake1", "req_fake2"]


async def test_a_fake_listens_where_it_is_told(http: httpx2.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    async with FakeAnthropicServer(port=port, host="127.0.0.1") as fake:
        assert fake.base_url == f"http://127.0.0.1:{port}"
        response = await http.post(f"{fake.base_url}/v1/messages", json=CHAT)
    assert response.status_code == 200


def draws(mix: ReplyMix, count: int) -> list[str]:
    """What ``count`` requests in a row get: ok, a status, stall or drop."""
    choose = mix.reply_function()
    out = []
    for _ in range(count):
        reply = choose({})
        if reply.status is not None:
            out.append(str(reply.status))
        elif reply.stall_after is not None:
            out.append("stall")
        elif reply.drop_after is not None:
            out.append("drop")
        else:
            out.append("ok")
    return out


def test_the_mix_is_repeatable_with_a_seed_and_keeps_its_shares() -> None:
    mix = ReplyMix(fail_rate=0.2, stall_rate=0.1, drop_rate=0.1, seed=7)
    first = draws(mix, 5000)
    assert draws(mix, 5000) == first  # each reply function starts again from the seed
    shares = {kind: n / 5000 for kind, n in Counter(first).items()}
    assert shares["500"] == pytest.approx(0.2, abs=0.03)
    assert shares["stall"] == pytest.approx(0.1, abs=0.03)
    assert shares["drop"] == pytest.approx(0.1, abs=0.03)
    assert shares["ok"] == pytest.approx(0.6, abs=0.03)
    assert set(draws(ReplyMix(stall_rate=1), 200)) == {"stall"}
    assert set(draws(ReplyMix(), 200)) == {"ok"}


def test_the_mix_replies_follow_the_settings() -> None:
    mix = ReplyMix(text="One two three four five.", ttft=0.2, token_rate=20, drop_rate=0.5)
    ok, faults = mix.replies()
    assert (ok.deltas, ok.ttft, ok.chunk_delay) == (
        ["One", " two", " three", " four", " five."],
        0.2,
        0.05,
    )
    assert ok.usage[1] == 5  # output tokens as sent
    assert [reply.drop_after for _, reply in faults] == [None, None, 2]  # half the reply
    assert ReplyMix(token_rate=float("inf")).replies()[0].chunk_delay == 0
    assert mix.describe() == "5 tokens, the first after 0.2 s, then 20/s; 50% drop after 2 tokens"


@pytest.mark.parametrize(
    ("settings", "fields"),
    [
        ({"fail_rate": 0.7, "drop_rate": 0.4}, ("fail_rate", "stall_rate", "drop_rate")),
        ({"stall_rate": 1.5}, ("stall_rate",)),
        ({"stall_rate": float("nan")}, ("stall_rate",)),
        ({"ttft": float("inf")}, ("ttft",)),
        ({"token_rate": -1.0}, ("token_rate",)),
        ({"fail_status": 302}, ("fail_status",)),
        ({"text": "Two words.", "stall_rate": 0.1, "stall_after": 3}, ("stall_after",)),
    ],
)
def test_the_mix_refuses_settings_that_make_no_sense(
    settings: dict[str, Any], fields: tuple[str, ...]
) -> None:
    with pytest.raises(ReplyMixError) as refused:
        ReplyMix(**settings)
    assert refused.value.fields == fields


async def test_a_429_from_the_mix_carries_retry_after() -> None:
    mix = ReplyMix(fail_rate=1, fail_status=429, retry_after=3)
    async with FakeOpenAIServer(default=mix.reply_function(), record=False) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        async with client:
            with pytest.raises(openai.RateLimitError) as limited:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "Hi"}]
                )
    headers = limited.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "3000")
