"""A fake Anthropic messages server."""

from __future__ import annotations

import json
import math
from typing import Any

from callbrain.testing.fake_llm.base import (
    FakeLLMServer,
    FakeToolCall,
    JSONObject,
    RecordedRequest,
    Reply,
    sse,
)

_ANTHROPIC_ERRORS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_INPUT_FRAGMENTS = 3
"""How many ``input_json_delta`` pieces a tool call's input is cut into, so a
client that does not accumulate them (or joins them wrongly) is caught."""


def _anthropic_error(status: int) -> JSONObject:
    """An Anthropic error body for ``status``."""
    kind = _ANTHROPIC_ERRORS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"Fake Anthropic error {status}."}}


def _has_text(reply: Reply) -> bool:
    """Whether the reply gets a text block: the API opens none for a tool-only answer."""
    return bool(reply.deltas)


def _tool_use_id(recorded: RecordedRequest, position: int, call: FakeToolCall) -> str:
    return call.id or f"toolu_fake{recorded.index}_{position}"


def _tool_input(call: FakeToolCall) -> JSONObject:
    """The ``input`` object of a complete ``tool_use`` block.

    A complete message can only carry an object, so scripted arguments that do
    not parse as one become ``{}``.
    """
    if isinstance(call.arguments, dict):
        return call.arguments
    try:
        parsed = json.loads(call.arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _stop_reason(reply: Reply) -> str:
    return "tool_use" if reply.tool_calls else "end_turn"


def _fragments(text: str) -> list[str]:
    """``text`` cut into up to :data:`_INPUT_FRAGMENTS` consecutive pieces."""
    if not text:
        return []
    size = math.ceil(len(text) / _INPUT_FRAGMENTS)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _anthropic_message(recorded: RecordedRequest, *, done: bool) -> JSONObject:
    """A ``message`` object: empty for ``message_start``, else complete."""
    reply = recorded.reply
    prompt, completion = reply.usage
    content: list[JSONObject] = []
    if done:
        if _has_text(reply):
            content.append({"type": "text", "text": reply.full_text})
        content.extend(
            {
                "type": "tool_use",
                "id": _tool_use_id(recorded, position, call),
                "name": call.name,
                "input": _tool_input(call),
            }
            for position, call in enumerate(reply.tool_calls)
        )
    return {
        "id": f"msg_fake{recorded.index}",
        "type": "message",
        "role": "assistant",
        "model": recorded.body.get("model", "fake"),
        "content": content,
        "stop_reason": _stop_reason(reply) if done else None,
        "stop_sequence": None,
        # message_start reports a token or so of output, as the real API does.
        "usage": {"input_tokens": prompt, "output_tokens": completion if done else 1},
    }


def _anthropic_event(**data: Any) -> bytes:
    """An Anthropic SSE event: its ``event:`` name repeats the data's ``type``."""
    return sse(data, data["type"])


class FakeAnthropicServer(FakeLLMServer):
    """A fake ``POST /v1/messages`` (Anthropic's messages API).

    Streams ``message_start``; when the reply has text, ``content_block_start``
    (a text block at index 0); ``ping``; one ``content_block_delta``
    (``text_delta``) per delta; then, per tool call, a ``content_block_start``
    (``tool_use``, ``input`` ``{}``), the arguments as a few
    ``input_json_delta`` fragments and a ``content_block_stop``; finally
    ``message_delta`` (``end_turn``, or ``tool_use`` when the reply made calls,
    and the output tokens) and ``message_stop``. Each block is closed before
    the next one opens, as the API does. Tool call ids default to
    ``toolu_fake{request}_{position}``. Arguments scripted as a string go out
    verbatim, even malformed (the real API would not send those; tests need
    them). Non-streaming requests get a ``message`` object with the text block
    and ``tool_use`` blocks (whose ``input`` is ``{}`` if the arguments do not
    parse as an object).
    """

    route = "/v1/messages"

    def _response_headers(self, recorded: RecordedRequest) -> dict[str, str]:
        return {"request-id": f"req_fake{recorded.index}"}

    def _error_body(self, status: int) -> JSONObject:
        return _anthropic_error(status)

    def _completion(self, recorded: RecordedRequest) -> JSONObject:
        return _anthropic_message(recorded, done=True)

    def _stream_head(self, recorded: RecordedRequest) -> list[bytes]:
        frames = [
            _anthropic_event(type="message_start", message=_anthropic_message(recorded, done=False))
        ]
        if _has_text(recorded.reply):
            block = {"type": "text", "text": ""}
            frames.append(
                _anthropic_event(type="content_block_start", index=0, content_block=block)
            )
        frames.append(_anthropic_event(type="ping"))
        return frames

    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _anthropic_event(type="content_block_delta", index=0, delta=delta)

    def _stream_tool_call(
        self, recorded: RecordedRequest, position: int, call: FakeToolCall
    ) -> list[bytes]:
        frames = []
        has_text = _has_text(recorded.reply)
        if position == 0 and has_text:
            frames.append(_anthropic_event(type="content_block_stop", index=0))
        index = position + 1 if has_text else position
        block = {
            "type": "tool_use",
            "id": _tool_use_id(recorded, position, call),
            "name": call.name,
            "input": {},
        }
        frames.append(
            _anthropic_event(type="content_block_start", index=index, content_block=block)
        )
        for piece in _fragments(call.arguments_text):
            delta = {"type": "input_json_delta", "partial_json": piece}
            frames.append(_anthropic_event(type="content_block_delta", index=index, delta=delta))
        frames.append(_anthropic_event(type="content_block_stop", index=index))
        return frames

    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        reply = recorded.reply
        frames = []
        # With tool calls the text block was closed before the first of them.
        if _has_text(reply) and not reply.tool_calls:
            frames.append(_anthropic_event(type="content_block_stop", index=0))
        stop = {"stop_reason": _stop_reason(reply), "stop_sequence": None}
        usage = {"output_tokens": reply.usage[1]}
        frames.append(_anthropic_event(type="message_delta", delta=stop, usage=usage))
        frames.append(_anthropic_event(type="message_stop"))
        return frames

    def _stream_malformed(self, recorded: RecordedRequest) -> bytes:
        delta = {"type": "text_delta", "text": "Hello"}
        whole = _anthropic_event(type="content_block_delta", index=0, delta=delta)
        return whole[: whole.index(b'"delta"')] + b"\n\n"
