"""The OpenAI backend's own behaviour: request shape, options and keys.

What it shares with the other remote backends is in ``test_llm_remote.py``.
"""

from __future__ import annotations

import pytest
from conftest import MakeLLM
from support import BACKENDS, RemoteBackend, collect, has_null, in_module_loop

from callbrain.llm import ChatRequest, Message, OpenAIConfig, TextDelta, create_llm
from callbrain.llm.openai import OpenAILLM
from callbrain.testing.fake_llm import FakeLLMServer


@pytest.fixture(scope="module")
def backend() -> RemoteBackend:
    return BACKENDS["openai"]


@in_module_loop
async def test_request_body_shape(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
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
async def test_empty_system_prompt_is_left_out(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    await collect(make_llm(), ChatRequest(system="", messages=(Message("user", "Hello?"),)))
    assert fake.requests[0].body["messages"] == [{"role": "user", "content": "Hello?"}]


@in_module_loop
async def test_sampling_options_and_extra_body_are_sent_when_set(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    llm = make_llm(temperature=0.3, top_p=0.9, max_tokens=60, extra_body={"top_k": 20})
    await collect(llm)
    body = fake.requests[0].body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 60)
    assert body["top_k"] == 20
    assert not has_null(body)


@in_module_loop
async def test_environment_supplies_key_and_base_url(
    fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
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
    fake: FakeLLMServer, make_llm: MakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    await collect(make_llm(api_key="config-key"))
    assert fake.requests[0].headers["authorization"] == "Bearer config-key"


@pytest.mark.usefixtures("_clean_provider_env")
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
