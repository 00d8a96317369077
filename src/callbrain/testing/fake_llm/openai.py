"""A fake OpenAI chat-completions server (OpenAI and compatible servers)."""

from __future__ import annotations

from callbrain.testing.fake_llm.base import FakeLLMServer, JSONObject, RecordedRequest, Reply, sse

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


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


class FakeOpenAIServer(FakeLLMServer):
    """A fake ``POST /v1/chat/completions`` (OpenAI and compatible servers).

    Streams ``data: {chat.completion.chunk}`` events: a first chunk with the
    assistant role and empty content, one chunk per delta, a final chunk with
    ``finish_reason: "stop"``, the usage chunk (empty ``choices``) when the
    request set ``stream_options.include_usage``, then ``data: [DONE]``.
    Non-streaming requests get a ``chat.completion`` object.
    """

    route = "/v1/chat/completions"
    api_prefix = "/v1"

    def _response_headers(self, recorded: RecordedRequest) -> dict[str, str]:
        return {"x-request-id": f"req_fake{recorded.index}", "openai-processing-ms": "1"}

    def _error_body(self, status: int) -> JSONObject:
        return _openai_error(status)

    def _completion(self, recorded: RecordedRequest) -> JSONObject:
        message = {"role": "assistant", "content": recorded.reply.full_text, "refusal": None}
        return {
            "id": f"chatcmpl-fake{recorded.index}",
            "object": "chat.completion",
            "created": int(recorded.received_at),
            "model": recorded.body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": _openai_usage(recorded.reply),
        }

    def _stream_head(self, recorded: RecordedRequest) -> list[bytes]:
        return [sse(_openai_chunk(recorded, {"role": "assistant", "content": ""}, None))]

    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        return sse(_openai_chunk(recorded, {"content": text}, None))

    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        frames = [sse(_openai_chunk(recorded, {}, "stop"))]
        if _openai_wants_usage(recorded):
            usage_chunk = _openai_chunk(recorded, {}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _openai_usage(recorded.reply)
            frames.append(sse(usage_chunk))
        frames.append(sse("[DONE]"))
        return frames
