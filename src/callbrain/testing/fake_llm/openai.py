"""A fake OpenAI chat-completions server (OpenAI and compatible servers).

Tool calls are streamed the way OpenAI streams them, fragment by fragment, so
that a client which forgets to accumulate arguments by ``index`` fails here
rather than in production.
"""

from __future__ import annotations

import math

from callbrain.testing.fake_llm.base import (
    FakeLLMServer,
    FakeToolCall,
    JSONObject,
    RecordedRequest,
    Reply,
    sse,
)

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

_ARGUMENT_FRAGMENTS = 3
"""At most this many argument fragments per call: more than one, so a client
must join them, as it must with OpenAI's token-by-token fragments."""


def _openai_error(status: int) -> JSONObject:
    """An OpenAI error body for ``status``."""
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
    message = f"Fake OpenAI error {status}."
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_chunk(recorded: RecordedRequest, delta: JSONObject, finish: str | None) -> JSONObject:
    """One ``chat.completion.chunk`` with a single choice."""
    chunk: JSONObject = {
        "id": f"chatcmpl-fake{recorded.index}",
        "object": "chat.completion.chunk",
        "created": int(recorded.received_at),
        "model": recorded.body.get("model", "fake"),
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if _openai_wants_usage(recorded):
        chunk["usage"] = None  # OpenAI sends an explicit null until the usage chunk
    return chunk


def _openai_usage(reply: Reply) -> JSONObject:
    """The ``usage`` object of a completion."""
    prompt, completion = reply.usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _openai_wants_usage(recorded: RecordedRequest) -> bool:
    options = recorded.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _openai_finish(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else "stop"


def _openai_call_id(recorded: RecordedRequest, position: int, call: FakeToolCall) -> str:
    """The scripted id, or one shaped like OpenAI's and unique per request and position."""
    return call.id or f"call_fake{recorded.index}_{position}"


def _split(text: str, pieces: int) -> list[str]:
    """``text`` in at most ``pieces`` consecutive parts (none for empty text)."""
    if not text:
        return []
    size = math.ceil(len(text) / pieces)
    return [text[i : i + size] for i in range(0, len(text), size)]


class FakeOpenAIServer(FakeLLMServer):
    """A fake ``POST /v1/chat/completions`` (OpenAI and compatible servers).

    Streams ``data: {chat.completion.chunk}`` events: a first chunk with the
    assistant role and empty content (``content: null`` when the reply is tool
    calls only, as OpenAI does), one chunk per text delta, then per tool call a
    chunk naming it (``index``, ``id``, ``type``, ``function.name``, empty
    ``function.arguments``) followed by up to three chunks carrying pieces of
    its arguments under the same ``index``. A final chunk has
    ``finish_reason`` ``"tool_calls"`` if the reply made any and ``"stop"``
    otherwise; the usage chunk (empty ``choices``) follows when the request set
    ``stream_options.include_usage``, then ``data: [DONE]``.

    Non-streaming requests get a ``chat.completion`` object whose message
    carries ``tool_calls`` (and ``content: null`` if there is no text).
    """

    route = "/v1/chat/completions"
    api_prefix = "/v1"

    def _response_headers(self, recorded: RecordedRequest) -> dict[str, str]:
        return {"x-request-id": f"req_fake{recorded.index}", "openai-processing-ms": "1"}

    def _error_body(self, status: int) -> JSONObject:
        return _openai_error(status)

    def _completion(self, recorded: RecordedRequest) -> JSONObject:
        reply = recorded.reply
        message: JSONObject = {"role": "assistant", "content": reply.full_text, "refusal": None}
        if reply.tool_calls:
            message["content"] = reply.full_text or None
            message["tool_calls"] = [
                {
                    "id": _openai_call_id(recorded, position, call),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_text},
                }
                for position, call in enumerate(reply.tool_calls)
            ]
        return {
            "id": f"chatcmpl-fake{recorded.index}",
            "object": "chat.completion",
            "created": int(recorded.received_at),
            "model": recorded.body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _openai_finish(reply),
                }
            ],
            "usage": _openai_usage(reply),
        }

    def _stream_head(self, recorded: RecordedRequest) -> list[bytes]:
        reply = recorded.reply
        content = None if reply.tool_calls and not reply.deltas else ""
        return [sse(_openai_chunk(recorded, {"role": "assistant", "content": content}, None))]

    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        return sse(_openai_chunk(recorded, {"content": text}, None))

    def _stream_tool_call(
        self, recorded: RecordedRequest, position: int, call: FakeToolCall
    ) -> list[bytes]:
        opening = {
            "index": position,
            "id": _openai_call_id(recorded, position, call),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        frames = [sse(_openai_chunk(recorded, {"tool_calls": [opening]}, None))]
        for piece in _split(call.arguments_text, _ARGUMENT_FRAGMENTS):
            fragment = {"index": position, "function": {"arguments": piece}}
            frames.append(sse(_openai_chunk(recorded, {"tool_calls": [fragment]}, None)))
        return frames

    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        frames = [sse(_openai_chunk(recorded, {}, _openai_finish(recorded.reply)))]
        if _openai_wants_usage(recorded):
            usage_chunk = _openai_chunk(recorded, {}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _openai_usage(recorded.reply)
            frames.append(sse(usage_chunk))
        frames.append(sse("[DONE]"))
        return frames

    def _stream_malformed(self, recorded: RecordedRequest) -> bytes:
        whole = sse(_openai_chunk(recorded, {"content": "Hello"}, None))
        return whole[: whole.index(b'"choices"')] + b"\n\n"
