"""The Anthropic backend's own behaviour: request shape, conversation
normalisation, usage and keys.

What it shares with the other remote backends is in ``test_llm_remote.py``.
"""

from __future__ import annotations

import pytest
from conftest import MakeLLM
from support import BACKENDS, RemoteBackend, collect, in_module_loop

from callbrain.llm import AnthropicConfig, ChatRequest, Message, TextDelta, create_llm
from callbrain.llm.anthropic import CALL_STARTED, AnthropicLLM, _input_tokens, normalize_messages
from callbrain.testing.fake_llm import FakeLLMServer, RecordedRequest


@pytest.fixture(scope="module")
def backend() -> RemoteBackend:
    return BACKENDS["anthropic"]


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
    usage = {
        "input_tokens": 10,
        "output_tokens": 1,
        "cache_read_input_tokens": 90,
        "cache_creation_input_tokens": 5,
    }
    assert _input_tokens(usage) == 105
    assert _input_tokens({"output_tokens": 3}) is None  # a message_delta without input


# -- the backend over loopback -------------------------------------------------------


@in_module_loop
async def test_request_body_shape(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
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
async def test_empty_system_prompt_is_left_out(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(), ChatRequest(system="", messages=(Message("user", "Hello?"),)))
    body = fake.requests[0].body
    assert "system" not in body
    assert body["messages"] == [{"role": "user", "content": "Hello?"}]


@in_module_loop
async def test_sampling_options_are_sent_when_set(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(temperature=0.3, top_p=0.9, max_tokens=60))
    body = fake.requests[0].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 60)


@in_module_loop
async def test_environment_supplies_key_and_base_url(
    fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
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


@pytest.mark.usefixtures("_clean_provider_env")
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
