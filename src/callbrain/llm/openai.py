"""OpenAI chat-completions backend; also any server that speaks that API.

vLLM, Ollama, llama.cpp's server, Groq and friends all accept the same
request, so one backend covers them through ``base_url``. The official SDK does
the HTTP, SSE parsing and retries; this module only maps neutral requests to
its parameters, its chunks to neutral chunks, and its errors to
:class:`~callbrain.llm.base.LLMError`.

Tool calls stream as fragments keyed by ``index`` (the name first, then the
arguments a few tokens at a time), so they are assembled with
:class:`~callbrain.llm.chat.ToolCallAssembler` and yielded whole when the
choice finishes: nothing can act on half a call. Text is yielded as it arrives,
since the caller is waiting to hear it.

``tools`` is only sent when the request has some, and ``parallel_tool_calls``
never: OpenAI's default already allows several calls per message (which the
neutral vocabulary carries), OpenAI rejects the option in a request without
tools, and not every compatible server knows it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import ClassVar, TypeVar, cast

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam

from callbrain.llm.base import (
    LLM,
    LLMError,
    resolve_api_key,
    retryable_status,
)
from callbrain.llm.chat import (
    ChatChunk,
    ChatRequest,
    TextDelta,
    ToolCallAssembler,
    Usage,
)
from callbrain.llm.config import OpenAIConfig
from callbrain.llm.openai_format import chat_messages, finished_calls, tool_params, used_call_ids

PROVIDER = "openai"

_T = TypeVar("_T")


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
        calls = ToolCallAssembler()
        # Only used when a compatible server leaves ids out; ids must still be
        # unique across the conversation, so they cannot just be the index.
        seed = f"{uuid.uuid4().hex[:8]}_"
        taken = used_call_ids(request)
        try:
            stream = await self._client.chat.completions.create(
                model=config.model,
                # The shared shapes are plain dicts; the SDK's are TypedDicts of the same.
                messages=cast(list[ChatCompletionMessageParam], chat_messages(request)),
                tools=(
                    cast(list[ChatCompletionToolUnionParam], tool_params(request.tools))
                    if request.tools
                    else openai.omit
                ),
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
                        delta = choice.delta
                        if delta.content:
                            yield TextDelta(delta.content)
                        for fragment in delta.tool_calls or ():
                            function = fragment.function
                            calls.add(
                                fragment.index,
                                id=fragment.id,
                                name=function.name if function else None,
                                arguments=function.arguments if function else None,
                            )
                        if choice.finish_reason is not None:
                            reason = choice.finish_reason
                            for call in finished_calls(
                                calls.calls(seed), reason, taken, provider=PROVIDER
                            ):
                                yield call
                            calls = ToolCallAssembler()
        except openai.APIError as exc:
            raise _translate(exc) from exc
        # Some compatible servers end the stream without a finish_reason.
        for call in finished_calls(calls.calls(seed), "stop", taken, provider=PROVIDER):
            yield call
        if usage is not None:
            yield usage

    async def aclose(self) -> None:
        await self._client.close()


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
