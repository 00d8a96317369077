"""The real anthropic SDK backend against the fake Anthropic server over loopback,
plus unit tests of the conversation normalisation it relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from anthropic.types import Usage as AnthropicUsage

from callbrain.llm import (
    AnthropicConfig,
    ChatChunk,
    ChatRequest,
    LLMError,
    LLMTimeoutError,
    Message,
    TextDelta,
    Usage,
    create_llm,
)
from callbrain.llm.anthropic import (
    CALL_STARTED,
    KEYLESS_PLACEHOLDER,
    AnthropicLLM,
    _input_tokens,
    normalize_messages,
)
from callbrain.testing.fake_llm import FakeAnthropicServer, RecordedRequest, Reply

REQUEST = ChatRequest(
    system="You are a friendly receptionist.",
    messages=(
        Message("assistant", "Hi, thanks for calling. How can I help?"),
        Message("user", "I'd like to book a table."),
    ),
)

MakeLLM = Callable[..., AnthropicLLM]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own Anthropic settings must not leak into these tests."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


# One fake server for the whole module (restarting uvicorn costs ~0.2 s), reset
# for each test; its tests and fixtures must then share the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as running:
        yield running


@pytest.fixture
def fake(server: FakeAnthropicServer) -> FakeAnthropicServer:
    server.reset()
    return server


@pytest_asyncio.fixture(loop_scope="module")
async def make_llm(fake: FakeAnthropicServer) -> AsyncIterator[MakeLLM]:
    made: list[AnthropicLLM] = []

    def make(**overrides: Any) -> AnthropicLLM:
        options = {
            "provider": "anthropic",
            "base_url": fake.base_url,
            "api_key": "test-key",
            "max_retries": 0,
            **overrides,
        }
        llm = AnthropicLLM(AnthropicConfig.model_validate(options))
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await llm.aclose()


async def collect(llm: AnthropicLLM, request: ChatRequest = REQUEST) -> list[ChatChunk]:
    async with llm.chat(request) as stream:
        return [chunk async for chunk in stream]


def sent_key(recorded: RecordedRequest) -> str | None:
    """The API key the SDK sent (a Bearer token in anthropic 2.x, x-api-key before)."""
    bearer = recorded.headers.get("authorization", "")
    return bearer.removeprefix("Bearer ") if bearer else recorded.headers.get("x-api-key")


# -- normalisation -----------------------------------------------------------------


def test_normalize_prepends_a_user_turn_before_the_greeting() -> None:
    greeting = Message("assistant", "Hi, how can I help?")
    assert normalize_messages([greeting, Message("user", "Hours?")]) == [
        Message("user", CALL_STARTED),
        greeting,
        Message("user", "Hours?"),
    ]


def test_normalize_empty_conversation_is_the_placeholder_alone() -> None:
    assert normalize_messages([]) == [Message("user", CALL_STARTED)]
    assert normalize_messages([Message("assistant", "  ")]) == [Message("user", CALL_STARTED)]


def test_normalize_merges_same_speaker_turns_and_drops_empty_ones() -> None:
    messages = [
        Message("user", "Hello?"),
        Message("assistant", ""),
        Message("user", "Anyone there?"),
        Message("assistant", "Yes, sorry."),
        Message("assistant", "How can I help?  "),
    ]
    assert normalize_messages(messages) == [
        Message("user", "Hello?\nAnyone there?"),
        Message("assistant", "Yes, sorry.\nHow can I help?"),
    ]


def test_normalize_keeps_a_well_formed_conversation() -> None:
    messages = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")]
    assert normalize_messages(messages) == messages


def test_input_tokens_include_cached_ones() -> None:
    usage = AnthropicUsage(
        input_tokens=10, output_tokens=1, cache_read_input_tokens=90, cache_creation_input_tokens=5
    )
    assert _input_tokens(usage) == 105


# -- the backend over loopback -------------------------------------------------------


@in_module_loop
async def test_streams_text_in_order_then_usage(
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
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
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Table for two at eight, done.", chunk_delay=0.01))
    chunks = await collect(make_llm())
    text = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert len(text) == 6
    assert "".join(text) == "Table for two at eight, done."


@in_module_loop
async def test_request_body_shape(fake: FakeAnthropicServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(model="claude-test"))
    recorded = fake.requests[0]
    assert recorded.path == "/v1/messages"
    assert sent_key(recorded) == "test-key"
    body = recorded.body
    assert body["model"] == "claude-test"
    assert body["system"] == "You are a friendly receptionist."
    assert body["messages"] == [
        {"role": "user", "content": CALL_STARTED},
        {"role": "assistant", "content": "Hi, thanks for calling. How can I help?"},
        {"role": "user", "content": "I'd like to book a table."},
    ]
    assert body["max_tokens"] == 1024
    assert body["stream"] is True
    assert not {"temperature", "top_p"} & body.keys()
    assert None not in body.values()


@in_module_loop
async def test_empty_system_prompt_is_left_out(
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(), ChatRequest(system="", messages=(Message("user", "Hello?"),)))
    body = fake.requests[0].body
    assert "system" not in body
    assert body["messages"] == [{"role": "user", "content": "Hello?"}]


@in_module_loop
async def test_sampling_options_are_sent_when_set(
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(temperature=0.3, top_p=0.9, max_tokens=60))
    body = fake.requests[0].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 60)


@in_module_loop
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (529, True), (400, False), (401, False), (404, False)],
)
async def test_http_errors_become_llm_errors(
    fake: FakeAnthropicServer, make_llm: MakeLLM, status: int, retryable: bool
) -> None:
    fake.script(Reply(status=status))
    with pytest.raises(LLMError) as caught:
        await collect(make_llm())
    assert caught.value.status == status
    assert caught.value.retryable is retryable
    assert caught.value.provider == "anthropic"
    assert len(fake.requests) == 1  # max_retries=0: the SDK did not retry


@in_module_loop
async def test_max_retries_retries_a_rate_limit_then_succeeds(
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(status=429), Reply("Fine."))
    chunks = await collect(make_llm(max_retries=1))
    assert [c for c in chunks if isinstance(c, TextDelta)] == [TextDelta("Fine.")]
    assert [r.outcome for r in fake.requests] == ["error_status", "completed"]


@in_module_loop
async def test_dropped_connection_mid_stream_is_a_retryable_error(
    fake: FakeAnthropicServer, make_llm: MakeLLM
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
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Never said.", stall_after=0))
    with pytest.raises(LLMTimeoutError):
        await collect(make_llm(first_token_timeout_s=0.3))
    await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)


@in_module_loop
async def test_stall_mid_stream_times_out_on_idle(
    fake: FakeAnthropicServer, make_llm: MakeLLM
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
    fake: FakeAnthropicServer, make_llm: MakeLLM
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
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["First", " second"], chunk_delay=5.0))
    stream = make_llm().chat(REQUEST)
    assert await anext(stream) == TextDelta("First")
    await stream.aclose()
    await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)


@in_module_loop
async def test_environment_supplies_key_and_base_url(
    fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    llm = AnthropicLLM(AnthropicConfig(provider="anthropic", max_retries=0))
    try:
        chunks = await collect(llm)
    finally:
        await llm.aclose()
    assert TextDelta("OK.") in chunks
    assert sent_key(fake.requests[0]) == "env-key"


@in_module_loop
async def test_keyless_proxy_gets_a_placeholder_key(
    fake: FakeAnthropicServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(api_key=None))
    assert sent_key(fake.requests[0]) == KEYLESS_PLACEHOLDER


def test_missing_key_without_base_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"llm\.api_key.*ANTHROPIC_API_KEY"):
        AnthropicLLM(AnthropicConfig(provider="anthropic"))


@in_module_loop
async def test_create_llm_builds_the_anthropic_backend() -> None:
    llm = create_llm(AnthropicConfig(provider="anthropic", api_key="k", model="claude-x"))
    try:
        assert isinstance(llm, AnthropicLLM)
        assert (llm.provider, llm.model) == ("anthropic", "claude-x")
    finally:
        await llm.aclose()
