"""The fake provider servers at the raw HTTP level, so that a wire-format bug
cannot hide behind an SDK that happens to tolerate it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from callbrain.testing.fake_llm import FakeAnthropicServer, FakeOpenAIServer, Reply

CHAT = {"model": "m-1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=5) as client:
        yield client


def sse_events(raw: str) -> list[list[str]]:
    """Split an SSE body into events (lists of lines), insisting on exact framing."""
    assert raw.endswith("\n\n"), "every event must end with a blank line"
    assert "\r" not in raw
    events = [event.split("\n") for event in raw[:-2].split("\n\n")]
    assert all(line for event in events for line in event), "no stray blank lines"
    return events


def openai_payloads(raw: str) -> list[Any]:
    events = sse_events(raw)
    assert all(len(e) == 1 and e[0].startswith("data: ") for e in events)
    assert events[-1] == ["data: [DONE]"]
    return [json.loads(e[0].removeprefix("data: ")) for e in events[:-1]]


def test_reply_splits_text_into_words_that_keep_their_spaces() -> None:
    assert Reply("Hello  there,\nfriend. ").deltas == ["Hello", "  there,", "\nfriend. "]
    assert Reply(["Hel", "lo"]).deltas == ["Hel", "lo"]
    assert Reply("").deltas == []
    assert Reply(" ").full_text == " "


async def test_openai_stream_wire_format(http: httpx2.AsyncClient) -> None:
    async with FakeOpenAIServer(Reply(["Hi", " there."], usage=(9, 2))) as fake:
        body = {**CHAT, "stream_options": {"include_usage": True}}
        response = await http.post(f"{fake.base_url}/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = openai_payloads(response.text)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m-1" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first, *content, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in content] == [
        {"content": "Hi"},
        {"content": " there."},
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *content])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert all(c["usage"] is None for c in [first, *content, finish])
    assert fake.requests[0].outcome == "completed"
    assert fake.requests[0].chunks_sent == 2


async def test_openai_stream_without_usage_option_has_no_usage(
    http: httpx2.AsyncClient,
) -> None:
    async with FakeOpenAIServer(Reply("Hi.")) as fake:
        response = await http.post(f"{fake.base_url}/chat/completions", json=CHAT)
    chunks = openai_payloads(response.text)
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)


async def test_anthropic_stream_wire_format(http: httpx2.AsyncClient) -> None:
    async with FakeAnthropicServer(Reply(["Hi", " there."], usage=(9, 2))) as fake:
        response = await http.post(f"{fake.base_url}/v1/messages", json=CHAT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all(len(e) == 2 and e[0].startswith("event: ") for e in events)
    assert all(e[1].startswith("data: ") for e in events)
    names = [e[0].removeprefix("event: ") for e in events]
    data = [json.loads(e[1].removeprefix("data: ")) for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [d["type"] for d in data] == names
    message = data[0]["message"]
    assert (message["model"], message["role"], message["content"]) == ("m-1", "assistant", [])
    assert message["usage"]["input_tokens"] == 9
    assert data[1]["content_block"] == {"type": "text", "text": ""}
    assert [d["delta"] for d in data[3:5]] == [
        {"type": "text_delta", "text": "Hi"},
        {"type": "text_delta", "text": " there."},
    ]
    assert data[6]["delta"]["stop_reason"] == "end_turn"
    assert data[6]["usage"] == {"output_tokens": 2}
    assert fake.requests[0].outcome == "completed"


@pytest.mark.parametrize("status", [429, 500])
async def test_error_bodies_are_provider_shaped(http: httpx2.AsyncClient, status: int) -> None:
    async with (
        FakeOpenAIServer(Reply(status=status)) as oa,
        FakeAnthropicServer(Reply(status=status)) as an,
    ):
        o = await http.post(f"{oa.base_url}/chat/completions", json=CHAT)
        a = await http.post(f"{an.base_url}/v1/messages", json=CHAT)
    assert (o.status_code, a.status_code) == (status, status)
    assert set(o.json()["error"]) == {"message", "type", "param", "code"}
    assert a.json()["type"] == "error"
    assert a.json()["error"]["type"] == ("rate_limit_error" if status == 429 else "api_error")
    for response in (o, a):
        assert ("retry-after" in response.headers) is (status == 429)
    assert oa.requests[0].outcome == an.requests[0].outcome == "error_status"


async def test_non_streaming_answers_parse_with_the_sdks() -> None:
    async with (
        FakeOpenAIServer(Reply("Hello there.")) as oa,
        FakeAnthropicServer(Reply("Hi back.", usage=(3, 4))) as an,
    ):
        async with openai.AsyncOpenAI(api_key="k", base_url=oa.base_url) as oc:
            completion = await oc.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}]
            )
        async with anthropic.AsyncAnthropic(api_key="k", base_url=an.base_url) as ac:
            message = await ac.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
            )
    assert completion.choices[0].message.content == "Hello there."
    assert completion.choices[0].finish_reason == "stop"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hi back."
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 4)


async def test_script_is_fifo_then_default(http: httpx2.AsyncClient) -> None:
    async with FakeOpenAIServer(Reply("one"), default=Reply("fallback")) as fake:
        fake.script(Reply("two"))
        texts = []
        for _ in range(3):
            response = await http.post(f"{fake.base_url}/chat/completions", json=CHAT)
            content = openai_payloads(response.text)[1:-1]
            texts.append("".join(c["choices"][0]["delta"]["content"] for c in content))
    assert texts == ["one", "two", "fallback"]
    assert [r.reply.full_text for r in fake.requests] == texts


async def test_headers_go_out_before_ttft_and_disconnect_is_recorded(
    http: httpx2.AsyncClient,
) -> None:
    async with FakeAnthropicServer(Reply("Slow.", ttft=5.0)) as fake:
        async with asyncio.timeout(2):  # far less than the 5 s ttft
            async with http.stream("POST", f"{fake.base_url}/v1/messages", json=CHAT) as response:
                assert response.status_code == 200
        recorded = await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)
    assert recorded.chunks_sent == 0
    assert recorded.ended is not None and recorded.ended >= recorded.started


async def test_drop_after_aborts_the_connection_mid_stream(http: httpx2.AsyncClient) -> None:
    async with FakeOpenAIServer(Reply(["a", "b", "c"], drop_after=2)) as fake:
        received = b""
        with pytest.raises(httpx2.RemoteProtocolError):
            async with http.stream("POST", f"{fake.base_url}/chat/completions", json=CHAT) as r:
                async for piece in r.aiter_bytes():
                    received += piece
        recorded = await fake.wait_for_outcome(0, "dropped")
    assert recorded.chunks_sent == 2
    assert b'"content":"b"' in received
    assert b'"content":"c"' not in received
    assert b"[DONE]" not in received


async def test_stop_aborts_a_stalled_stream_promptly(http: httpx2.AsyncClient) -> None:
    fake = FakeOpenAIServer(Reply("never", stall_after=0))
    await fake.start()
    async with http.stream("POST", f"{fake.base_url}/chat/completions", json=CHAT) as response:
        assert response.status_code == 200
        await fake.wait_for_requests(1)
        # uvicorn alone would wait its 2 s graceful-shutdown timeout for this stream.
        async with asyncio.timeout(1.5):
            await fake.stop()
        with pytest.raises(httpx2.RemoteProtocolError):
            await response.aread()
    assert fake.requests[0].outcome == "dropped"
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.base_url


async def test_wait_for_outcome_fails_fast_on_a_different_outcome(
    http: httpx2.AsyncClient,
) -> None:
    async with FakeOpenAIServer() as fake:
        await http.post(f"{fake.base_url}/chat/completions", json=CHAT)
        async with asyncio.timeout(1):
            with pytest.raises(AssertionError, match="'completed', not 'client_disconnected'"):
                await fake.wait_for_outcome(0, "client_disconnected", timeout=10)
        with pytest.raises(TimeoutError, match="request #1"):
            await fake.wait_for_outcome(1, "completed", timeout=0.1)


async def test_malformed_after_sends_an_event_cut_off_mid_json(http: httpx2.AsyncClient) -> None:
    async with (
        FakeOpenAIServer(Reply(["a", "b"], malformed_after=1)) as oa,
        FakeAnthropicServer(Reply(["a", "b"], malformed_after=1)) as an,
    ):
        o = await http.post(f"{oa.base_url}/chat/completions", json=CHAT)
        a = await http.post(f"{an.base_url}/v1/messages", json=CHAT)
    for response, event_line in ((o, None), (a, "event: content_block_delta")):
        events = sse_events(response.text)
        broken = [n for n, e in enumerate(events) if not parses(e[-1])]
        assert len(broken) == 1
        [n] = broken
        assert events[n][-1].startswith("data: {") and events[n][:-1] == (
            [event_line] if event_line else []
        )
        # After the first content chunk; the stream then goes on as scripted.
        assert '"a"' in events[n - 1][-1] and '"b"' in events[n + 1][-1]
    assert oa.requests[0].outcome == an.requests[0].outcome == "completed"


def parses(data_line: str) -> bool:
    """Whether an SSE data line is JSON (or OpenAI's ``[DONE]``)."""
    try:
        json.loads(data_line.removeprefix("data: "))
    except ValueError:
        return data_line == "data: [DONE]"
    return True


async def test_ending_events_cuts_the_ending_short(http: httpx2.AsyncClient) -> None:
    usage = {**CHAT, "stream_options": {"include_usage": True}}
    async with (
        FakeOpenAIServer(Reply("Hi.", ending_events=2)) as oa,
        FakeAnthropicServer(Reply("Hi.", ending_events=1)) as an,
    ):
        o = sse_events((await http.post(f"{oa.base_url}/chat/completions", json=usage)).text)
        a = sse_events((await http.post(f"{an.base_url}/v1/messages", json=CHAT)).text)
    # OpenAI: the finish chunk and the usage chunk, no [DONE].
    finish, usage_chunk = (json.loads(e[0].removeprefix("data: ")) for e in o[-2:])
    assert finish["choices"][0]["finish_reason"] == "stop" and usage_chunk["usage"]
    # Anthropic: the text block's stop, then nothing: no message_delta or message_stop.
    assert [e[0] for e in a[-2:]] == ["event: content_block_delta", "event: content_block_stop"]


async def test_hold_open_keeps_the_body_open_after_the_ending(http: httpx2.AsyncClient) -> None:
    async with FakeAnthropicServer(Reply("Hi.", hold_open=True)) as fake:
        received = b""
        async with http.stream("POST", f"{fake.base_url}/v1/messages", json=CHAT) as response:
            async for piece in response.aiter_bytes():
                received += piece
                if b"event: message_stop" in received:
                    break
        # It never ended the body itself: we hung up on it.
        await fake.wait_for_outcome(0, "client_disconnected")
