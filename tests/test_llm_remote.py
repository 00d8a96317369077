"""What every remote backend promises, checked for OpenAI and Anthropic alike:
the real SDK against its fake server over loopback."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MakeLLM
from support import BACKENDS, REQUEST, RemoteBackend, collect, in_module_loop

from callbrain.llm import ChatChunk, LLMError, LLMTimeoutError, TextDelta, Usage
from callbrain.llm.base import KEYLESS_PLACEHOLDER
from callbrain.testing.fake_llm import FakeLLMServer, Reply


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> RemoteBackend:
    return BACKENDS[request.param]


@in_module_loop
async def test_streams_text_in_order_then_usage(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    fake.script(Reply(["Sure", ",", " for how", " many?"], usage=(31, 5)))
    chunks = await collect(make_llm())
    assert chunks == [
        TextDelta("Sure"),
        TextDelta(","),
        TextDelta(" for how"),
        TextDelta(" many?"),
        Usage(input_tokens=31, output_tokens=5),
    ]
    assert fake.requests[0].outcome == "completed"


@in_module_loop
async def test_word_split_reply_joins_back_to_the_text(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Table for two at eight, done.", chunk_delay=0.01))
    chunks = await collect(make_llm())
    text = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert len(text) == 6
    assert "".join(text) == "Table for two at eight, done."


@in_module_loop
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (529, True), (400, False), (401, False), (404, False)],
)
async def test_http_errors_become_llm_errors(
    backend: RemoteBackend, fake: FakeLLMServer, make_llm: MakeLLM, status: int, retryable: bool
) -> None:
    fake.script(Reply(status=status))
    with pytest.raises(LLMError) as caught:
        await collect(make_llm())
    assert caught.value.status == status
    assert caught.value.retryable is retryable
    assert caught.value.provider == backend.name
    assert len(fake.requests) == 1  # max_retries=0: the SDK did not retry


@in_module_loop
async def test_max_retries_retries_a_rate_limit_then_succeeds(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(status=429), Reply("Fine."))
    chunks = await collect(make_llm(max_retries=1))
    assert [c for c in chunks if isinstance(c, TextDelta)] == [TextDelta("Fine.")]
    assert [r.outcome for r in fake.requests] == ["error_status", "completed"]


@in_module_loop
async def test_dropped_connection_mid_stream_is_a_retryable_error(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["One", " two", " three"], drop_after=1))
    received: list[ChatChunk] = []
    with pytest.raises(LLMError) as caught:
        async with make_llm().chat(REQUEST) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert received == [TextDelta("One")]
    assert not isinstance(caught.value, LLMTimeoutError)
    assert caught.value.retryable
    assert caught.value.status is None
    assert fake.requests[0].outcome == "dropped"


@in_module_loop
async def test_stall_before_first_token_times_out_and_hangs_up(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Never said.", stall_after=0))
    with pytest.raises(LLMTimeoutError):
        await collect(make_llm(first_token_timeout_s=0.3))
    await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)


@in_module_loop
async def test_stall_mid_stream_times_out_on_idle(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    fake.script(Reply(["Let", " me", " check."], stall_after=1))
    received: list[ChatChunk] = []
    with pytest.raises(LLMTimeoutError):
        async with make_llm(first_token_timeout_s=5, idle_timeout_s=0.3).chat(REQUEST) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert received == [TextDelta("Let")]
    await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)


@in_module_loop
async def test_cancelling_the_consumer_closes_the_connection_at_once(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["First", " second"], chunk_delay=5.0))
    llm = make_llm()
    got_first = asyncio.Event()

    async def consume() -> None:
        async with llm.chat(REQUEST) as stream:
            async for _ in stream:
                got_first.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(2):
        await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Well before the 5 s the next chunk would take.
    recorded = await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)
    assert recorded.chunks_sent == 1


@in_module_loop
async def test_stream_aclose_closes_the_connection_at_once(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["First", " second"], chunk_delay=5.0))
    stream = make_llm().chat(REQUEST)
    assert await anext(stream) == TextDelta("First")
    await stream.aclose()
    await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)


@in_module_loop
async def test_keyless_server_gets_a_placeholder_key(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(api_key=None))
    sent = fake.requests[0].headers
    keys = (sent.get("authorization", "").removeprefix("Bearer "), sent.get("x-api-key"))
    assert KEYLESS_PLACEHOLDER in keys
