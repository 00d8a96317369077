"""Anthropic messages backend.

The official SDK does the HTTP, the retries and the errors, and
:mod:`callbrain.llm.sse` reads the body; this module maps neutral requests to
the request body, the stream's events (read as plain dicts by
:class:`EventReader`) to neutral chunks, and the SDK's errors to
:class:`~callbrain.llm.base.LLMError`. It also repairs the
conversation shape, because Anthropic (unlike OpenAI) insists that messages
start with a user turn and alternate, while a phone call starts with the
agent's greeting and transcripts may hold empty or back-to-back turns.

Tool calls make that shape stricter. A call is a ``tool_use`` block inside the
assistant turn, and its result is a ``tool_result`` block in the *user* turn
right after it; there is no separate tool role as in OpenAI. So the outputs of
one assistant turn become a single user message, and whatever the caller said
next joins that message, after the results, because the API wants the
``tool_result`` blocks first. Normalisation may merge text turns but never
moves a call away from its result.

In the stream a call's input arrives as ``input_json_delta`` fragments of its
content block; they are joined per block index and the call is yielded, whole,
at that block's ``content_block_stop``: as soon as it is complete, not at the
end of the message, so text that follows does not hold it back. Text deltas
still go out the moment they arrive.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import anthropic
from anthropic.types import (
    MessageParam,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

from callbrain.llm.base import (
    LLM,
    LLMError,
    client_options,
    retryable_status,
)
from callbrain.llm.chat import (
    ChatChunk,
    ChatItem,
    ChatRequest,
    Message,
    TextDelta,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Usage,
)
from callbrain.llm.config import AnthropicConfig
from callbrain.llm.events import read_events
from callbrain.llm.sse import AnthropicEvents

CALL_STARTED = "(The call has started.)"
"""The user turn put before a conversation that does not start with one."""

DEFAULT_MAX_TOKENS = 1024
PROVIDER = "anthropic"


class AnthropicLLM(LLM):
    """Streams messages through one ``anthropic.AsyncAnthropic`` client."""

    provider: ClassVar[str] = PROVIDER

    def __init__(self, config: AnthropicConfig) -> None:
        super().__init__(
            model=config.model,
            first_token_timeout=config.first_token_timeout_s,
            idle_timeout=config.idle_timeout_s,
        )
        self.config = config
        self._client = anthropic.AsyncAnthropic(
            **client_options(
                config,
                provider="anthropic",
                key_envs=("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
                base_url_env="ANTHROPIC_BASE_URL",
                aiohttp_client=anthropic.DefaultAioHttpClient,
            )
        )

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        config = self.config
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": _params(normalize_messages(request.messages)),
            "stream": True,
            **_sampling(config),
        }
        if request.system:
            body["system"] = request.system
        if request.tools:
            body["tools"] = [_tool(spec) for spec in request.tools]
        try:
            # The SDK's own HTTP, retries and errors, without its SSE decoder
            # (llm/sse.py reads the body) or a pydantic object per event (see
            # EventReader).
            stream = await self._client.post(
                "/v1/messages",
                body=body,
                cast_to=object,
                stream=True,
                stream_cls=AnthropicEvents,
            )
            # The SDK stream owns the HTTP response: leaving this block for any
            # reason (the finish, an error, cancellation, aclose) closes it.
            async with (
                stream,
                aclosing(read_events(stream, EventReader(), provider=PROVIDER)) as chunks,
            ):
                async for chunk in chunks:
                    yield chunk
        except anthropic.APIError as exc:
            raise _translate(exc) from exc

    def without_retries(self) -> AnthropicLLM:
        if self.config.max_retries == 0:
            return self
        quick = copy.copy(self)
        quick._client = self._client.with_options(max_retries=0)  # same connection pool
        return quick

    async def aclose(self) -> None:
        await self._client.close()


class EventReader:
    """Turns the messages API's stream events, as plain dicts, into neutral chunks.

    Text deltas are passed on as they arrive; a ``tool_use`` block's
    ``input_json_delta`` fragments are joined and the call yielded whole at the
    block's ``content_block_stop``; usage (``message_start``'s input, the last
    ``message_delta``'s output) at ``message_stop``, which ends the answer.
    Reading dicts rather than the SDK's event objects saves building a pydantic
    object for every token. Fields the API always sends are indexed, so an event
    without them is a malformed stream (:mod:`callbrain.llm.events`).
    """

    def __init__(self) -> None:
        self.finished = False
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        # Open tool_use blocks by content block index: id, name, input fragments.
        self._calls: dict[int, tuple[str, str, list[str]]] = {}

    def feed(self, event: dict[str, Any]) -> Iterator[ChatChunk]:
        kind = event["type"]
        if kind == "content_block_delta":  # by far the most frequent: one per token
            delta = event["delta"]
            if delta["type"] == "text_delta":
                if text := delta["text"]:
                    yield TextDelta(text)
            elif delta["type"] == "input_json_delta" and event["index"] in self._calls:
                self._calls[event["index"]][2].append(delta["partial_json"])
        elif kind == "content_block_start":
            block = event["content_block"]
            if block["type"] == "tool_use":
                self._calls[event["index"]] = (block["id"], block["name"], [])
        elif kind == "content_block_stop":
            if (done := self._calls.pop(event["index"], None)) is not None:
                call_id, name, parts = done
                # A call without arguments streams no fragments.
                yield ToolCall(call_id, name, "".join(parts) or "{}")
        elif kind == "message_start":
            self._count(event["message"]["usage"])
        elif kind == "message_delta":
            self._count(event["usage"])
        elif kind == "message_stop":
            self.finished = True
            if self._input_tokens is not None and self._output_tokens is not None:
                yield Usage(self._input_tokens, self._output_tokens)

    def end(self) -> Iterator[ChatChunk]:
        """Nothing, or an error if the stream ended before ``message_stop``:
        the API always sends it, so the answer may have been cut short."""
        if not self.finished:
            raise LLMError(
                "anthropic: the stream ended before message_stop",
                provider=PROVIDER,
                retryable=True,
            )
        return iter(())

    def _count(self, usage: dict[str, Any]) -> None:
        # message_delta's counts are cumulative; its input count is optional.
        if (tokens := _input_tokens(usage)) is not None:
            self._input_tokens = tokens
        if (output := usage.get("output_tokens")) is not None:
            self._output_tokens = output


@dataclass(slots=True)
class _Turn:
    """One speaker's stretch of the conversation while it is being merged."""

    role: Literal["user", "assistant"]
    texts: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    outputs: list[ToolOutput] = field(default_factory=list)


def normalize_messages(messages: Sequence[ChatItem]) -> list[ChatItem]:
    """Reshape a conversation into what the messages API accepts.

    Drops empty turns, trims whitespace (a final assistant turn must not end
    with any), merges consecutive turns of one speaker, and starts with a user
    turn: a call usually opens with the agent's greeting, so a short
    placeholder user turn goes first, and an empty conversation becomes just
    that placeholder.

    Tool outputs count as the user's side (that is where the API wants their
    results), so a user turn here is the outputs answering the previous
    assistant turn, in their order, then at most one user message; an assistant
    turn is one message, its text first, then its calls in their order. Turns
    alternate; calls and outputs are never dropped, only text is merged around
    them.
    """
    turns: list[_Turn] = []

    def turn_of(role: Literal["user", "assistant"]) -> _Turn:
        if not turns or turns[-1].role != role:
            turns.append(_Turn(role))
        return turns[-1]

    for item in messages:
        if isinstance(item, ToolOutput):
            turn_of("user").outputs.append(item)
            continue
        text = item.content.strip()
        if not text and not item.tool_calls:
            continue
        turn = turn_of(item.role)
        if text:
            turn.texts.append(text)
        turn.tool_calls.extend(item.tool_calls)
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", [CALL_STARTED]))
    items: list[ChatItem] = []
    for turn in turns:
        content = "\n".join(turn.texts)
        if turn.role == "assistant":
            items.append(Message("assistant", content, tuple(turn.tool_calls)))
            continue
        items.extend(turn.outputs)
        if content:
            items.append(Message("user", content))
    return items


def _params(items: Sequence[ChatItem]) -> list[MessageParam]:
    """Message params for a normalised conversation: each run of user-side
    items (tool outputs, then user text) becomes one user message."""
    params: list[MessageParam] = []
    run: list[ChatItem] = []
    for item in items:
        if isinstance(item, Message) and item.role == "assistant":
            if run:
                params.append(_user_param(run))
                run = []
            params.append(_assistant_param(item))
        else:
            run.append(item)
    if run:
        params.append(_user_param(run))
    return params


def _user_param(run: Sequence[ChatItem]) -> MessageParam:
    # Plain text goes out as a string, as it did before tools, so requests
    # without tools keep their exact shape.
    if len(run) == 1 and isinstance(run[0], Message):
        return {"role": "user", "content": run[0].content}
    blocks: list[TextBlockParam | ToolResultBlockParam] = []
    for item in run:
        if isinstance(item, ToolOutput):
            blocks.append(_tool_result(item))
        else:
            blocks.append({"type": "text", "text": item.content})
    return {"role": "user", "content": blocks}


def _assistant_param(message: Message) -> MessageParam:
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    blocks: list[TextBlockParam | ToolUseBlockParam] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks.extend(
        {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call)}
        for call in message.tool_calls
    )
    return {"role": "assistant", "content": blocks}


def _tool_input(call: ToolCall) -> dict[str, object]:
    """The call's arguments as the object ``tool_use.input`` must be.

    The model may have written malformed JSON; the tools layer coped with that
    when it ran the call, and the API rejects anything but an object here, so
    such a call is replayed with ``{}``.
    """
    try:
        parsed = json.loads(call.arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _tool_result(output: ToolOutput) -> ToolResultBlockParam:
    block: ToolResultBlockParam = {"type": "tool_result", "tool_use_id": output.call_id}
    # ``content`` is optional; a blank one risks the API's "text content blocks
    # must contain non-whitespace text" rejection, so it is left out instead.
    if output.content.strip():
        block["content"] = output.content
    if output.is_error:
        block["is_error"] = True
    return block


def _tool(spec: ToolSpec) -> ToolParam:
    tool: ToolParam = {"name": spec.name, "input_schema": spec.parameters}
    # Optional in the API; an empty one says nothing and may be refused.
    if spec.description:
        tool["description"] = spec.description
    return tool


def _sampling(config: AnthropicConfig) -> dict[str, float]:
    """temperature/top_p, only when set (this SDK version has no parameters for
    them; the body is built here anyway)."""
    options = {"temperature": config.temperature, "top_p": config.top_p}
    return {name: value for name, value in options.items() if value is not None}


def _input_tokens(usage: dict[str, Any]) -> int | None:
    """All input tokens, cached ones included, to compare with OpenAI's count."""
    tokens = usage.get("input_tokens")
    if tokens is None:
        return None
    cached = (usage.get("cache_creation_input_tokens") or 0) + (
        usage.get("cache_read_input_tokens") or 0
    )
    return int(tokens) + cached


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
