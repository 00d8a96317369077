"""OpenAI chat-completions backend; also any server that speaks that API.

vLLM, Ollama, llama.cpp's server, Groq and friends all accept the same
request, so one backend covers them through ``base_url``. The official SDK does
the HTTP, SSE parsing and retries; this module only maps neutral requests to
its parameters, its chunks to neutral chunks, and its errors to
:class:`~callbrain.llm.base.LLMError`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import ClassVar, TypeVar

import openai
from openai.types.chat import ChatCompletionMessageParam

from callbrain.llm.base import (
    LLM,
    ChatChunk,
    ChatRequest,
    LLMError,
    TextDelta,
    Usage,
    resolve_api_key,
    retryable_status,
)
from callbrain.llm.config import OpenAIConfig

_T = TypeVar("_T")


class OpenAILLM(LLM):
    """Streams chat completions through one ``openai.AsyncOpenAI`` client."""

    provider: ClassVar[str] = "openai"

    def __init__(self, config: OpenAIConfig) -> None:
        super().__init__(
            model=config.model,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.config = config
        # One client per LLM, so every call of an agent reuses its connection pool.
        # None lets the SDK fall back to OPENAI_API_KEY / OPENAI_BASE_URL itself.
        self._client = openai.AsyncOpenAI(
            api_key=resolve_api_key(
                provider="openai",
                configured=config.api_key,
                key_envs=("OPENAI_API_KEY",),
                base_url=config.base_url,
                base_url_env="OPENAI_BASE_URL",
            ),
            base_url=config.base_url or None,
            max_retries=config.max_retries,
        )

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        config = self.config
        usage: Usage | None = None
        try:
            stream = await self._client.chat.completions.create(
                model=config.model,
                messages=_messages(request),
                stream=True,
                stream_options={"include_usage": True},
                temperature=_given(config.temperature),
                top_p=_given(config.top_p),
                max_tokens=_given(config.max_tokens),
                extra_body=config.extra_body or None,
            )
            # The SDK stream owns the HTTP response: leaving this block for any
            # reason (end, error, cancellation, aclose) closes the connection.
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
        except openai.APIError as exc:
            raise _translate(exc) from exc
        if usage is not None:
            yield usage

    async def aclose(self) -> None:
        await self._client.close()


def _messages(request: ChatRequest) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        if message.role == "user":
            messages.append({"role": "user", "content": message.content})
        else:
            messages.append({"role": "assistant", "content": message.content})
    return messages


def _given(value: _T | None) -> _T | openai.Omit:
    """Leave unset options out of the request rather than sending nulls."""
    return openai.omit if value is None else value


def _translate(exc: openai.APIError) -> LLMError:
    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return LLMError(
            f"openai: HTTP {status} {name}: {exc.message}",
            provider="openai",
            status=status,
            retryable=retryable_status(status),
        )
    # Connection errors and SDK timeouts (APITimeoutError is a connection
    # error), and errors the server reported inside an open stream.
    return LLMError(f"openai: {name}: {exc.message}", provider="openai", retryable=True)
