"""Shared pieces for the remote-backend tests (imported by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from callbrain.agent import Agent
from callbrain.llm import LLM, AnthropicConfig, ChatChunk, ChatRequest, Message, OpenAIConfig
from callbrain.llm.anthropic import AnthropicLLM
from callbrain.llm.openai import OpenAILLM
from callbrain.testing.fake_llm import FakeAnthropicServer, FakeLLMServer, FakeOpenAIServer

REQUEST = ChatRequest(
    system="You are a friendly receptionist.",
    messages=(
        Message("assistant", "Hi, thanks for calling. How can I help?"),
        Message("user", "I'd like to book a table."),
    ),
)

# One fake server per module (restarting uvicorn costs ~0.2 s), reset for each
# test; those tests and fixtures must then share the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class RemoteBackend:
    """A provider backend and the fake server that speaks its wire format."""

    name: str
    llm: type[LLM]
    config: type[BaseModel]
    fake: type[FakeLLMServer]
    env: tuple[str, ...]
    """Variables its SDK reads, kept out of the tests."""


BACKENDS = {
    "openai": RemoteBackend(
        "openai",
        OpenAILLM,
        OpenAIConfig,
        FakeOpenAIServer,
        ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"),
    ),
    "anthropic": RemoteBackend(
        "anthropic",
        AnthropicLLM,
        AnthropicConfig,
        FakeAnthropicServer,
        ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"),
    ),
}


async def collect(llm: LLM, request: ChatRequest = REQUEST) -> list[ChatChunk]:
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


def llm_config(fake: FakeLLMServer, **options: Any) -> OpenAIConfig | AnthropicConfig:
    """The model settings that point at ``fake`` in its own wire format: a test
    key and no SDK retries (a test that wants them says so in ``options``)."""
    name = "anthropic" if isinstance(fake, FakeAnthropicServer) else "openai"
    fields = {"provider": name, "base_url": fake.base_url, "api_key": "test-key", "max_retries": 0}
    config = BACKENDS[name].config.model_validate({**fields, **options})
    assert isinstance(config, OpenAIConfig | AnthropicConfig)
    return config


def agent_on(fake: FakeLLMServer, *, llm: dict[str, Any] | None = None, **fields: Any) -> Agent:
    """An agent whose model is ``fake``; ``fields`` are the agent's own settings
    and ``llm`` extra model settings (timeouts, model name)."""
    defaults: dict[str, Any] = {"name": "test", "begin_message": "Hello."}
    return Agent(**{**defaults, "llm": llm_config(fake, **(llm or {})), **fields})


def openai_tools(*tools: tuple[str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``tools`` parameter the chat-completions API expects, for (name,
    description, parameters) triples: the payload spelled out once."""
    return [
        {
            "type": "function",
            "function": {"name": name, "description": description, "parameters": parameters},
        }
        for name, description, parameters in tools
    ]
