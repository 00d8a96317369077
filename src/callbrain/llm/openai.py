"""OpenAI chat-completions backend; also any server that speaks that API.

vLLM, Ollama, llama.cpp's server, Groq and friends all accept the same
request, so one backend covers them through ``base_url``. The official SDK does
the HTTP, the retries and the errors; the response body is read by
:mod:`callbrain.llm.sse` (the SDK's SSE decoder cost 15% of the server's CPU
at 1,000 calls). This module maps neutral requests to the API's parameters,
its chunks to neutral chunks, and its errors to
:class:`~callbrain.llm.base.LLMError`.

Tool calls stream as fragments keyed by ``index`` (the name first, then the
arguments a few tokens at a time), so they are assembled with
:class:`~callbrain.llm.openai_format.ChunkReader` and yielded whole when the
choice finishes: nothing can act on half a call. Text is yielded as it arrives,
since the caller is waiting to hear it.

``tools`` is only sent when the request has some, and ``parallel_tool_calls``
never: OpenAI's default already allows several calls per message (which the
neutral vocabulary carries), OpenAI rejects the option in a request without
tools, and not every compatible server knows it.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, ClassVar

import openai

from callbrain.llm.base import (
    LLM,
    LLMError,
    client_options,
    retryable_status,
)
from callbrain.llm.chat import ChatChunk, ChatRequest
from callbrain.llm.config import OpenAIConfig
from callbrain.llm.events import read_events
from callbrain.llm.openai_format import ChunkReader, chat_messages, tool_params
from callbrain.llm.sse import OpenAIEvents

PROVIDER = "openai"


class OpenAILLM(LLM):
    """Streams chat completions through one ``openai.AsyncOpenAI`` client."""

    provider: ClassVar[str] = PROVIDER

    def __init__(self, config: OpenAIConfig) -> None:
        super().__init__(
            model=config.model,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.config = config
        self._client = openai.AsyncOpenAI(
            **client_options(
                config,
                provider="openai",
                key_envs=("OPENAI_API_KEY",),
                base_url_env="OPENAI_BASE_URL",
                aiohttp_client=openai.DefaultAioHttpClient,
            )
        )

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "messages": chat_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = tool_params(request.tools)
        for option in ("temperature", "top_p", "max_tokens"):
            if (value := getattr(config, option)) is not None:
                body[option] = value
        body.update(config.extra_body)
        reader = ChunkReader(request, provider=PROVIDER)
        try:
            # The SDK's own HTTP, retries and errors, with three costs skipped:
            # re-validating a body built from typed shapes, its SSE decoder
            # (llm/sse.py reads the body), and a pydantic object per chunk (see
            # openai_format.ChunkReader).
            stream = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=object,
                stream=True,
                stream_cls=OpenAIEvents,
            )
            # The SDK stream owns the HTTP response: leaving this block for any
            # reason (the finish, an error, cancellation, aclose) closes it.
            async with stream, aclosing(read_events(stream, reader, provider=PROVIDER)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except openai.APIError as exc:
            raise _translate(exc) from exc

    def without_retries(self) -> OpenAILLM:
        if self.config.max_retries == 0:
            return self
        quick = copy.copy(self)
        quick._client = self._client.with_options(max_retries=0)  # same connection pool
        return quick

    async def aclose(self) -> None:
        await self._client.close()


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
