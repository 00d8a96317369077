"""Test a Retell agent without a phone: a Retell-side client and fake LLM providers.

Everything runs over real sockets on loopback: :class:`RetellClient` speaks
Retell's side of the WebSocket protocol, and :class:`FakeOpenAIServer` /
:class:`FakeAnthropicServer` speak the providers' streaming HTTP formats, so the
official SDKs run end to end. See docs/testing.md.
"""

from __future__ import annotations

from callbrain.testing.agent_server import serve_agent
from callbrain.testing.checker import ProtocolChecker, Violation
from callbrain.testing.client import ResponseTurn, RetellClient, agent, user
from callbrain.testing.fake_llm import (
    FakeAnthropicServer,
    FakeLLMServer,
    FakeOpenAIServer,
    FakeToolCall,
    RecordedRequest,
    Reply,
)
from callbrain.testing.serve import serve_asgi

__all__ = [
    "FakeAnthropicServer",
    "FakeLLMServer",
    "FakeOpenAIServer",
    "FakeToolCall",
    "ProtocolChecker",
    "RecordedRequest",
    "Reply",
    "ResponseTurn",
    "RetellClient",
    "Violation",
    "agent",
    "serve_agent",
    "serve_asgi",
    "user",
]
