"""A fake Anthropic messages server."""

from __future__ import annotations

from typing import Any

from callbrain.testing.fake_llm.base import FakeLLMServer, JSONObject, RecordedRequest, sse

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


def _anthropic_error(status: int) -> JSONObject:
    """An Anthropic error body for ``status``."""
    kind = _ANTHROPIC_ERRORS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": f"Fake Anthropic error {status}."}}


def _anthropic_message(recorded: RecordedRequest, text: str | None) -> JSONObject:
    """A ``message`` object: empty for ``message_start`` (text None), else complete."""
    prompt, completion = recorded.reply.usage
    done = text is not None
    return {
        "id": f"msg_fake{recorded.index}",
        "type": "message",
        "role": "assistant",
        "model": recorded.body.get("model", "fake"),
        "content": [{"type": "text", "text": text}] if done else [],
        "stop_reason": "end_turn" if done else None,
        "stop_sequence": None,
        # message_start reports a token or so of output, as the real API does.
        "usage": {"input_tokens": prompt, "output_tokens": completion if done else 1},
    }


def _anthropic_event(**data: Any) -> bytes:
    """An Anthropic SSE event: its ``event:`` name repeats the data's ``type``."""
    return sse(data, data["type"])


class FakeAnthropicServer(FakeLLMServer):
    """A fake ``POST /v1/messages`` (Anthropic's messages API).

    Streams ``message_start``, ``content_block_start`` (text), ``ping``, one
    ``content_block_delta`` (``text_delta``) per delta, ``content_block_stop``,
    ``message_delta`` (``end_turn`` and the output tokens) and ``message_stop``.
    Non-streaming requests get a ``message`` object.
    """

    route = "/v1/messages"

    def _response_headers(self, recorded: RecordedRequest) -> dict[str, str]:
        return {"request-id": f"req_fake{recorded.index}"}

    def _error_body(self, status: int) -> JSONObject:
        return _anthropic_error(status)

    def _completion(self, recorded: RecordedRequest) -> JSONObject:
        return _anthropic_message(recorded, recorded.reply.full_text)

    def _stream_head(self, recorded: RecordedRequest) -> list[bytes]:
        block = {"type": "text", "text": ""}
        return [
            _anthropic_event(type="message_start", message=_anthropic_message(recorded, None)),
            _anthropic_event(type="content_block_start", index=0, content_block=block),
            _anthropic_event(type="ping"),
        ]

    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _anthropic_event(type="content_block_delta", index=0, delta=delta)

    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        usage = {"output_tokens": recorded.reply.usage[1]}
        return [
            _anthropic_event(type="content_block_stop", index=0),
            _anthropic_event(type="message_delta", delta=stop, usage=usage),
            _anthropic_event(type="message_stop"),
        ]
