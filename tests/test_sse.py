"""The OpenAI stream's body as callbrain reads it (callbrain.llm.sse): any split
of the bytes, any line ending, several data lines, comments and fields that do
not matter; and, over a real socket through the real SDKs, OpenAI's error event
and a body with CRLF line endings, twice on one client, Anthropic's pings and
its error event."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from callbrain.llm import ChatRequest, LLMError, Message, TextDelta
from callbrain.llm.anthropic import AnthropicLLM
from callbrain.llm.config import AnthropicConfig, OpenAIConfig
from callbrain.llm.openai import OpenAILLM
from callbrain.llm.sse import event_data
from callbrain.testing.serve import serve_asgi


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read(parts: Iterable[bytes]) -> list[bytes]:
    return [data async for data in event_data(_chunks(parts))]


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


BODY = (
    b": a comment, then a keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b"event: ignored\nid: 7\nretry: 10\n"
    b'data: {"b":\ndata: 2}\n\n'
    b"data:[DONE]\n\n"
)
EXPECTED = [b'{"a": 1}', b'{"b":\n2}', b"[DONE]"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
async def test_events_survive_any_split_and_line_ending(ending: bytes, cuts: list[int]) -> None:
    body = BODY.replace(b"\n", ending)
    assert await _read(_split(body, cuts)) == EXPECTED


async def test_a_last_event_without_its_blank_line_still_counts() -> None:
    assert await _read([b'data: {"a": 1}\n\ndata: {"b": 2}\n']) == [b'{"a": 1}', b'{"b": 2}']
    assert await _read([b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\r']) == [b'{"a": 1}', b'{"b": 2}']


async def test_events_without_data_are_skipped() -> None:
    assert await _read([b": ping\n\nevent: x\n\n\n\n"]) == []


def _chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


REQUEST = ChatRequest(system="", messages=(Message("user", "Hi"),))


async def _events(request: Request) -> StreamingResponse:
    kind = request.path_params["kind"]

    async def body() -> AsyncIterator[bytes]:
        if kind == "error":
            yield b"data: " + _chunk("Hel") + b"\n\n"
            yield b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
            return
        for event in (_chunk("Hel"), _chunk("lo."), _chunk(finish="stop"), b"[DONE]"):
            yield b"data: " + event + b"\r\n\r\n"  # CRLF, as some servers write it

    return StreamingResponse(body(), media_type="text/event-stream")


def _anthropic_event(name: str, data: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _anthropic(request: Request) -> StreamingResponse:
    kind = request.path_params["kind"]
    message = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "m",
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
    block = {"type": "text", "text": ""}

    async def body() -> AsyncIterator[bytes]:
        yield _anthropic_event("message_start", {"type": "message_start", "message": message})
        yield _anthropic_event("ping", {"type": "ping"})
        yield _anthropic_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        delta = {"type": "text_delta", "text": "Hel"}
        yield _anthropic_event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )
        yield _anthropic_event("ping", {"type": "ping"})
        if kind == "error":
            error = {"type": "overloaded_error", "message": "Overloaded"}
            yield _anthropic_event("error", {"type": "error", "error": error})
            return
        delta = {"type": "text_delta", "text": "lo."}
        yield _anthropic_event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )
        yield _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _anthropic_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 2},
            },
        )
        yield _anthropic_event("message_stop", {"type": "message_stop"})

    return StreamingResponse(body(), media_type="text/event-stream")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = Starlette(
        routes=[
            Route("/{kind}/chat/completions", _events, methods=["POST"]),
            Route("/{kind}/v1/messages", _anthropic, methods=["POST"]),
        ]
    )
    async with serve_asgi(app) as url:
        yield url


def _llm(url: str, kind: str) -> OpenAILLM:
    config = OpenAIConfig(
        provider="openai", model="m", base_url=f"{url}/{kind}", api_key="k", max_retries=0
    )
    return OpenAILLM(config)


async def test_crlf_events_are_read_through_the_sdk_turn_after_turn(server: str) -> None:
    llm = _llm(server, "crlf")
    try:
        for _ in range(2):
            async with llm.chat(REQUEST) as stream:
                texts = [c.text async for c in stream if isinstance(c, TextDelta)]
            assert "".join(texts) == "Hello."
            assert stream.metrics.outcome == "ok"
    finally:
        await llm.aclose()


def _claude(url: str, kind: str) -> AnthropicLLM:
    config = AnthropicConfig(
        provider="anthropic", model="m", base_url=f"{url}/{kind}", api_key="k", max_retries=0
    )
    return AnthropicLLM(config)


async def test_anthropic_pings_are_skipped_and_the_answer_streams(server: str) -> None:
    llm = _claude(server, "fine")
    try:
        async with llm.chat(REQUEST) as stream:
            texts = [c.text async for c in stream if isinstance(c, TextDelta)]
    finally:
        await llm.aclose()
    assert "".join(texts) == "Hello."
    assert stream.metrics.outcome == "ok"


@pytest.mark.parametrize(
    ("provider", "said"), [("openai", "overloaded"), ("anthropic", "Overloaded")]
)
async def test_an_error_event_is_a_retryable_llm_error_after_the_words(
    server: str, provider: str, said: str
) -> None:
    llm = _llm(server, "error") if provider == "openai" else _claude(server, "error")
    texts: list[str] = []
    try:
        with pytest.raises(LLMError) as raised:
            async with llm.chat(REQUEST) as stream:
                async for chunk in stream:
                    if isinstance(chunk, TextDelta):
                        texts.append(chunk.text)
    finally:
        await llm.aclose()
    assert texts == ["Hel"]
    assert said in str(raised.value)
    assert raised.value.retryable
