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
from typing import ClassVar, TypeVar

import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
    ChatCompletionToolMessageParam,
)

from callbrain.llm.base import (
    LLM,
    ChatChunk,
    ChatRequest,
    LLMError,
    Message,
    TextDelta,
    ToolOutput,
    Usage,
    resolve_api_key,
    retryable_status,
)
from callbrain.llm.chat import ToolCallAssembler
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
        calls = ToolCallAssembler()
        # Only used when a compatible server leaves ids out; ids must still be
        # unique across the conversation, so they cannot just be the index.
        seed = f"{uuid.uuid4().hex[:8]}_"
        try:
            stream = await self._client.chat.completions.create(
                model=config.model,
                messages=_messages(request),
                tools=_tools(request),
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
                            for call in calls.calls(seed):
                                yield call
                            calls = ToolCallAssembler()
        except openai.APIError as exc:
            raise _translate(exc) from exc
        # Some compatible servers end the stream without a finish_reason.
        for call in calls.calls(seed):
            yield call
        if usage is not None:
            yield usage

    async def aclose(self) -> None:
        await self._client.close()


def _messages(request: ChatRequest) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for item in request.messages:
        if isinstance(item, ToolOutput):
            messages.append(_tool_message(item))
        elif item.role == "user":
            messages.append({"role": "user", "content": item.content})
        else:
            messages.append(_assistant_message(item))
    return messages


def _assistant_message(message: Message) -> ChatCompletionAssistantMessageParam:
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    assistant: ChatCompletionAssistantMessageParam = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ],
    }
    # Content is optional beside tool calls, and an empty string is not "none".
    if message.content:
        assistant["content"] = message.content
    return assistant


def _tool_message(output: ToolOutput) -> ChatCompletionToolMessageParam:
    """A ``tool`` message; the wire has no error flag, so errors say so in the text.

    A failed output gets an ``"Error: "`` prefix unless it already starts with
    "error" (any case), so the model does not read it as the tool's answer.
    """
    content = output.content
    if output.is_error and not content.lower().startswith("error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": output.call_id, "content": content}


def _tools(request: ChatRequest) -> list[ChatCompletionFunctionToolParam] | openai.Omit:
    # An empty list is not the same as no tools: OpenAI rejects "tools": [].
    if not request.tools:
        return openai.omit
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in request.tools
    ]


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
