"""The real openai SDK backend against the fake OpenAI server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from callbrain.llm import (
    ChatChunk,
    ChatRequest,
    LLMError,
    LLMTimeoutError,
    Message,
    OpenAIConfig,
    TextDelta,
    Usage,
    create_llm,
)
from callbrain.llm.openai import KEYLESS_PLACEHOLDER, OpenAILLM
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply

REQUEST = ChatRequest(
    system="You are a friendly receptionist.",
    messages=(
        Message("assistant", "Hi, thanks for calling. How can I help?"),
        Message("user", "I'd like to book a table."),
    ),
)

MakeLLM = Callable[..., OpenAILLM]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own OpenAI settings must not leak into these tests."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


# One fake server for the whole module (restarting uvicorn costs ~0.2 s), reset
# for each test; its tests and fixtures must then share the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
def fake(server: FakeOpenAIServer) -> FakeOpenAIServer:
    server.reset()
    return server


@pytest_asyncio.fixture(loop_scope="module")
async def make_llm(fake: FakeOpenAIServer) -> AsyncIterator[MakeLLM]:
    made: list[OpenAILLM] = []

    def make(**overrides: Any) -> OpenAILLM:
        options = {
            "provider": "openai",
            "base_url": fake.base_url,
            "api_key": "test-key",
            "max_retries": 0,
            **overrides,
        }
        llm = OpenAILLM(OpenAIConfig.model_validate(options))
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await llm.aclose()


async def collect(llm: OpenAILLM, request: ChatRequest = REQUEST) -> list[ChatChunk]:
    async with llm.chat(request) as stream:
        return [chunk async for chunk in stream]


def has_null(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(has_null(v) for v in value)
    return False


@in_module_loop
async def test_streams_text_in_order_then_usage(fake: FakeOpenAIServer, make_llm: MakeLLM) -> None:
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
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Table for two at eight, done.", chunk_delay=0.01))
    chunks = await collect(make_llm())
    text = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert len(text) == 6
    assert "".join(text) == "Table for two at eight, done."


@in_module_loop
async def test_request_body_shape(fake: FakeOpenAIServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(model="gpt-test"))
    recorded = fake.requests[0]
    assert recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == "Bearer test-key"
    body = recorded.body
    assert body["model"] == "gpt-test"
    assert body["messages"] == [
        {"role": "system", "content": "You are a friendly receptionist."},
        {"role": "assistant", "content": "Hi, thanks for calling. How can I help?"},
        {"role": "user", "content": "I'd like to book a table."},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert not {"temperature", "top_p", "max_tokens"} & body.keys()
    assert not has_null(body)


@in_module_loop
async def test_empty_system_prompt_is_left_out(fake: FakeOpenAIServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(), ChatRequest(system="", messages=(Message("user", "Hello?"),)))
    assert fake.requests[0].body["messages"] == [{"role": "user", "content": "Hello?"}]


@in_module_loop
async def test_sampling_options_and_extra_body_are_sent_when_set(
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    llm = make_llm(temperature=0.3, top_p=0.9, max_tokens=60, extra_body={"top_k": 20})
    await collect(llm)
    body = fake.requests[0].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 60)
    assert body["top_k"] == 20
    assert not has_null(body)


@in_module_loop
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (400, False), (401, False), (404, False)],
)
async def test_http_errors_become_llm_errors(
    fake: FakeOpenAIServer, make_llm: MakeLLM, status: int, retryable: bool
) -> None:
    fake.script(Reply(status=status))
    with pytest.raises(LLMError) as caught:
        await collect(make_llm())
    assert caught.value.status == status
    assert caught.value.retryable is retryable
    assert caught.value.provider == "openai"
    assert len(fake.requests) == 1  # max_retries=0: the SDK did not retry


@in_module_loop
async def test_max_retries_retries_a_rate_limit_then_succeeds(
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(status=429), Reply("Fine."))
    chunks = await collect(make_llm(max_retries=1))
    assert [c for c in chunks if isinstance(c, TextDelta)] == [TextDelta("Fine.")]
    assert [r.outcome for r in fake.requests] == ["error_status", "completed"]


@in_module_loop
async def test_dropped_connection_mid_stream_is_a_retryable_error(
    fake: FakeOpenAIServer, make_llm: MakeLLM
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
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Never said.", stall_after=0))
    with pytest.raises(LLMTimeoutError):
        await collect(make_llm(first_token_timeout_s=0.3))
    await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)


@in_module_loop
async def test_stall_mid_stream_times_out_on_idle(
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
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
    fake: FakeOpenAIServer, make_llm: MakeLLM
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
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["First", " second"], chunk_delay=5.0))
    stream = make_llm().chat(REQUEST)
    assert await anext(stream) == TextDelta("First")
    await stream.aclose()
    await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)


@in_module_loop
async def test_environment_supplies_key_and_base_url(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    llm = OpenAILLM(OpenAIConfig(provider="openai", max_retries=0))
    try:
        chunks = await collect(llm)
    finally:
        await llm.aclose()
    assert TextDelta("OK.") in chunks
    assert fake.requests[0].headers["authorization"] == "Bearer env-key"


@in_module_loop
async def test_config_wins_over_environment(
    fake: FakeOpenAIServer, make_llm: MakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    await collect(make_llm(api_key="config-key"))
    assert fake.requests[0].headers["authorization"] == "Bearer config-key"


@in_module_loop
async def test_keyless_local_server_gets_a_placeholder_key(
    fake: FakeOpenAIServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(api_key=None))
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEYLESS_PLACEHOLDER}"


def test_missing_key_without_base_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"llm\.api_key.*OPENAI_API_KEY"):
        OpenAILLM(OpenAIConfig(provider="openai"))


@in_module_loop
async def test_create_llm_builds_the_openai_backend() -> None:
    llm = create_llm(OpenAIConfig(provider="openai", api_key="k", model="gpt-x"))
    try:
        assert isinstance(llm, OpenAILLM)
        assert (llm.provider, llm.model) == ("openai", "gpt-x")
        assert (llm.first_token_timeout, llm.idle_timeout) == (10.0, 10.0)
    finally:
        await llm.aclose()
