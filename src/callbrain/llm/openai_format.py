"""The OpenAI chat-completions shapes, shared by every backend that speaks them.

The OpenAI backend sends them over HTTP and the local backend hands them to
llama.cpp, which renders them with the model's chat template; both stream tool
calls back as the same fragments. The rules for getting those shapes right
live here once:

* an error output says so in its text (the ``tool`` role has no error flag);
* earlier calls' arguments go back as a JSON object, ``{}`` when the model wrote
  something else: llama.cpp parses them for templates that take objects, and
  one that does not parse fails that request and every later turn of the call;
* a call that ``max_tokens`` cut off is dropped, not run: repairing
  ``{"day": "Wedn`` would act on what the model never finished saying;
* every call id is unique in the conversation, since outputs pair with calls by id.

Streamed answers are read as plain ``chat.completion.chunk`` dicts by
:class:`ChunkReader`, for both backends. The OpenAI SDK could build a pydantic
object per chunk, but at one chunk per token that was a fifth of a busy
server's CPU (measured with ``callbrain bench``), for fields we read once.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from callbrain.llm.chat import (
    ChatChunk,
    ChatRequest,
    Message,
    TextDelta,
    ToolCall,
    ToolCallAssembler,
    ToolOutput,
    ToolSpec,
    Usage,
)

logger = logging.getLogger("callbrain.llm")


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def chat_messages(request: ChatRequest, *, name_outputs: bool = False) -> list[dict[str, Any]]:
    """The system prompt and conversation as chat-completions messages.

    ``name_outputs`` adds the tool's ``name`` to each output, for chat templates
    that label outputs by tool name rather than by call id (OpenAI's API has no
    such field, so it is off by default).
    """
    messages = [{"role": "system", "content": request.system}] if request.system else []
    for item in request.messages:
        if isinstance(item, ToolOutput):
            messages.append(_tool_message(item, name_outputs))
        elif item.tool_calls:
            messages.append(_assistant_message(item))
        else:
            messages.append({"role": item.role, "content": item.content})
    return messages


def _assistant_message(message: Message) -> dict[str, Any]:
    assistant: dict[str, Any] = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": call.arguments if is_json_object(call.arguments) else "{}",
                },
            }
            for call in message.tool_calls
        ],
    }
    # Content is optional beside tool calls, and an empty string is not "none".
    if message.content:
        assistant["content"] = message.content
    return assistant


def _tool_message(output: ToolOutput, name_outputs: bool) -> dict[str, Any]:
    content = output.content
    if output.is_error and not content.lower().startswith("error"):
        content = f"Error: {content}"
    message = {"role": "tool", "tool_call_id": output.call_id, "content": content}
    if name_outputs:
        message["name"] = output.name
    return message


def tool_params(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """The ``tools`` parameter; callers leave it out entirely when there are none
    (OpenAI rejects ``"tools": []``)."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]


def finished_calls(
    calls: list[ToolCall], finish_reason: str, taken: set[str], *, provider: str
) -> Iterator[ToolCall]:
    """The calls of a finished choice that are safe to run, each with an unused id.

    Only the last call can have been cut off by ``max_tokens`` (finish reason
    ``length``); it is dropped unless its arguments are a whole JSON object.
    ``taken`` holds the ids already used and is updated.
    """
    if finish_reason == "length" and calls and not is_json_object(calls[-1].arguments):
        cut = calls.pop()
        logger.warning(
            "%s: dropped a call to %s that max_tokens cut off (%d characters of arguments); "
            "raise llm.max_tokens if this recurs",
            provider,
            cut.name,
            len(cut.arguments),
        )
    for call in calls:
        if call.id in taken:
            # Where the model writes the ids itself (Mistral's format) it can repeat one.
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", call.name, call.arguments)
        taken.add(call.id)
        yield call


def used_call_ids(request: ChatRequest) -> set[str]:
    """Ids of the calls already in the conversation."""
    return {c.id for m in request.messages if isinstance(m, Message) for c in m.tool_calls}


class ChunkReader:
    """Turns a stream of ``chat.completion.chunk`` dicts into neutral chunks.

    Text is passed on as it arrives; tool-call fragments are assembled and the
    calls yielded whole when their choice finishes (nothing can act on half a
    call); usage is passed on when reported.
    """

    def __init__(self, request: ChatRequest, *, provider: str) -> None:
        self.provider = provider
        self.finished = False
        """Whether a choice reported its ``finish_reason``."""
        self._calls = ToolCallAssembler()
        # Only used when a server leaves ids out; ids must still be unique across
        # the conversation, so they cannot just be the index.
        self._seed = f"{uuid.uuid4().hex[:8]}_"
        self._taken = used_call_ids(request)

    def feed(self, chunk: dict[str, Any]) -> Iterator[ChatChunk]:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                yield TextDelta(text)
            for fragment in delta.get("tool_calls") or ():
                function = fragment.get("function") or {}
                self._calls.add(
                    fragment.get("index", 0),
                    id=fragment.get("id"),
                    name=function.get("name"),
                    arguments=function.get("arguments"),
                )
            if reason := choice.get("finish_reason"):
                self.finished = True
                yield from self._flush(reason)
        if usage := chunk.get("usage"):
            yield Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)

    def end(self) -> Iterator[ToolCall]:
        """Calls still pending when the stream ended without a ``finish_reason``:
        some compatible servers leave it out (and the SDK hides whether ``[DONE]``
        came), so such a stream counts as complete."""
        return self._flush("stop")

    def _flush(self, reason: str) -> Iterator[ToolCall]:
        calls, self._calls = self._calls.calls(self._seed), ToolCallAssembler()
        return finished_calls(calls, reason, self._taken, provider=self.provider)
