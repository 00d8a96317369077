"""Shared pieces for the remote-backend tests (imported by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import BaseModel

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
