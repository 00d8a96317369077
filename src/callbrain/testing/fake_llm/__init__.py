"""Scripted fake LLM providers on loopback that speak the real wire formats.

The provider SDKs are the code most likely to surprise us (how they retry,
surface a dropped connection, or close a stream), so tests should drive the
*real* SDK against a server instead of mocking it. :class:`FakeOpenAIServer`
and :class:`FakeAnthropicServer` are such servers: real HTTP on a free
loopback port, real Server-Sent Events byte for byte as the providers send
them, and a script of :class:`Reply` objects saying what to answer, how fast,
and how to fail::

    async with FakeOpenAIServer(Reply("Hello there.", ttft=0.05)) as fake:
        llm = OpenAILLM(OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k"))
        ...
        assert fake.requests[0].body["model"] == "gpt-4o-mini"

Every request is recorded as a :class:`RecordedRequest` (parsed JSON body,
headers, how many content chunks went out, how it ended), and the ``wait_for_*``
helpers let a test wait for an outcome instead of sleeping and hoping; for
example, proof that cancelling a consumer closed the provider connection::

    await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)

A :data:`ReplyFunction` as ``default`` chooses each reply from the request
instead, and ``record=False`` keeps a long-running fake from growing; that is
how ``callbrain fake-llm`` (:mod:`callbrain.testing.fake_llm.command`) serves
seeded random mixes of good, failing and stalling replies for load tests.

Provider specifics live in small per-provider encoder functions so that new
reply features (tool calls) only add encoders.
"""

from __future__ import annotations

from callbrain.testing.fake_llm.anthropic import FakeAnthropicServer
from callbrain.testing.fake_llm.base import (
    FakeLLMServer,
    FakeToolCall,
    Outcome,
    RecordedRequest,
    Reply,
    ReplyFunction,
)
from callbrain.testing.fake_llm.openai import FakeOpenAIServer

__all__ = [
    "FakeAnthropicServer",
    "FakeLLMServer",
    "FakeOpenAIServer",
    "FakeToolCall",
    "Outcome",
    "RecordedRequest",
    "Reply",
    "ReplyFunction",
]
