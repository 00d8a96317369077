"""Anthropic messages backend.

The official SDK does the HTTP, SSE parsing and retries; this module maps
neutral requests to its parameters, raw stream events to neutral chunks, and
its errors to :class:`~callbrain.llm.base.LLMError`. It also repairs the
conversation shape, because Anthropic (unlike OpenAI) insists that messages
start with a user turn and alternate, while a phone call starts with the
agent's greeting and transcripts may hold empty or back-to-back turns.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import ClassVar

import anthropic
import httpx2
from anthropic.types import (
    MessageDeltaUsage,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
)
from anthropic.types import Usage as AnthropicUsage

from callbrain.llm.base import (
    LLM,
    ChatChunk,
    ChatRequest,
    LLMError,
    Message,
    TextDelta,
    Usage,
    resolve_api_key,
    retryable_status,
)
from callbrain.llm.config import AnthropicConfig

CALL_STARTED = "(The call has started.)"
"""The user turn put before a conversation that does not start with one."""

DEFAULT_MAX_TOKENS = 1024


class AnthropicLLM(LLM):
    """Streams messages through one ``anthropic.AsyncAnthropic`` client."""

    provider: ClassVar[str] = "anthropic"

    def __init__(self, config: AnthropicConfig) -> None:
        super().__init__(
            model=config.model,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.config = config
        # One client per LLM, so every call of an agent reuses its connection pool.
        # None lets the SDK fall back to ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL itself.
        self._client = anthropic.AsyncAnthropic(
            api_key=resolve_api_key(
                provider="anthropic",
                configured=config.api_key,
                key_envs=("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
                base_url=config.base_url,
                base_url_env="ANTHROPIC_BASE_URL",
            ),
            base_url=config.base_url or None,
            max_retries=config.max_retries,
        )

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        config = self.config
        input_tokens: int | None = None
        output_tokens: int | None = None
        try:
            stream = await self._client.messages.create(
                model=config.model,
                max_tokens=config.max_tokens or DEFAULT_MAX_TOKENS,
                system=request.system or anthropic.omit,
                messages=[_param(m) for m in normalize_messages(request.messages)],
                stream=True,
                extra_body=_sampling(config) or None,
            )
            # The SDK stream owns the HTTP response: leaving this block for any
            # reason (end, error, cancellation, aclose) closes the connection.
            async with stream:
                async for event in stream:
                    if isinstance(event, RawContentBlockDeltaEvent):
                        if event.delta.type == "text_delta" and event.delta.text:
                            yield TextDelta(event.delta.text)
                    elif isinstance(event, RawMessageStartEvent):
                        input_tokens = _input_tokens(event.message.usage)
                        output_tokens = event.message.usage.output_tokens
                    elif isinstance(event, RawMessageDeltaEvent):
                        if (cumulative := _input_tokens(event.usage)) is not None:
                            input_tokens = cumulative
                        output_tokens = event.usage.output_tokens
        except anthropic.APIError as exc:
            raise _translate(exc) from exc
        except httpx2.TransportError as exc:
            # Unlike openai's, this SDK lets transport errors met while reading
            # the stream (a dropped connection) escape unwrapped.
            raise LLMError(
                f"anthropic: {type(exc).__name__}: {exc}", provider="anthropic", retryable=True
            ) from exc
        if input_tokens is not None and output_tokens is not None:
            yield Usage(input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.close()


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """Reshape a conversation into what the messages API accepts.

    Drops empty turns, trims whitespace (a final assistant turn must not end
    with any), merges consecutive turns of one speaker, and starts with a user
    turn: a call usually opens with the agent's greeting, so a short
    placeholder user turn goes first, and an empty conversation becomes just
    that placeholder.
    """
    merged: list[Message] = []
    for message in messages:
        content = message.content.strip()
        if not content:
            continue
        if merged and merged[-1].role == message.role:
            content = f"{merged[-1].content}\n{content}"
            merged[-1] = Message(message.role, content)
        else:
            merged.append(Message(message.role, content))
    if not merged or merged[0].role != "user":
        merged.insert(0, Message("user", CALL_STARTED))
    return merged


def _param(message: Message) -> MessageParam:
    if message.role == "user":
        return {"role": "user", "content": message.content}
    return {"role": "assistant", "content": message.content}


def _sampling(config: AnthropicConfig) -> dict[str, float]:
    """temperature/top_p, only when set. This SDK version has no parameters
    for them, so they travel as extra JSON fields."""
    options = {"temperature": config.temperature, "top_p": config.top_p}
    return {name: value for name, value in options.items() if value is not None}


def _input_tokens(usage: AnthropicUsage | MessageDeltaUsage) -> int | None:
    """All input tokens, cached ones included, to compare with OpenAI's count."""
    if usage.input_tokens is None:
        return None
    cached = (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
    return usage.input_tokens + cached


def _translate(exc: anthropic.APIError) -> LLMError:
    name = type(exc).__name__
    # An `event: error` inside a 200 stream arrives as an APIStatusError that
    # carries the 200; those are server-side failures, so treat them as retryable.
    if isinstance(exc, anthropic.APIStatusError) and exc.status_code >= 400:
        status = exc.status_code
        return LLMError(
            f"anthropic: HTTP {status} {name}: {exc.message}",
            provider="anthropic",
            status=status,
            retryable=retryable_status(status),
        )
    return LLMError(f"anthropic: {name}: {exc.message}", provider="anthropic", retryable=True)
