"""Scripted fake LLM providers on loopback that speak the real wire formats.

The provider SDKs are the code most likely to surprise us (how they retry,
surface a dropped connection, or close a stream), so tests should drive the
*real* SDK against a server instead of mocking it. :class:`FakeOpenAIServer`
and :class:`FakeAnthropicServer` are such servers: real HTTP on a free
loopback port, real Server-Sent Events byte for byte as the providers send
them, and a script of :class:`Reply` objects saying what to answer, how fast,
and how to fail::

    async with FakeOpenAIServer(Reply("Hello there.", ttft=0.05)) as fake:
        llm = OpenAILLM(OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k"))
        ...
        assert fake.requests[0].body["model"] == "gpt-4o-mini"

Every request is recorded as a :class:`RecordedRequest` (parsed JSON body,
headers, how many content chunks went out, how it ended), and the ``wait_for_*``
helpers let a test wait for an outcome instead of sleeping and hoping; for
example, proof that cancelling a consumer closed the provider connection::

    await fake.wait_for_outcome(0, "client_disconnected", timeout=1.0)

Provider specifics live in small per-provider encoder functions so that new
reply features (tool calls) only add encoders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from callbrain.testing.serve import serve_asgi

__all__ = [
    "FakeAnthropicServer",
    "FakeLLMServer",
    "FakeOpenAIServer",
    "Outcome",
    "RecordedRequest",
    "Reply",
]

Outcome = Literal["open", "completed", "client_disconnected", "dropped", "error_status"]
"""How a recorded request ended; ``"open"`` while it is still being answered."""

JSONObject = dict[str, Any]

_WORD = re.compile(r"\s*\S+\s*$|\s*\S+|\s+")


@dataclass
class Reply:
    """One scripted completion: what to say, how fast, and how to fail.

    ``text`` as a ``str`` is split into word-sized deltas that keep their
    spaces (``"".join(reply.deltas) == text``); a sequence gives the exact
    deltas. A "content chunk" below is one such delta on the wire.
    """

    text: str | Sequence[str] = "OK."
    ttft: float = 0.0
    """Seconds from the request to the first content chunk. The HTTP status,
    headers and content-free preamble events go out at once, as real providers
    do, so a client's first-token deadline must look at content, not bytes."""
    chunk_delay: float = 0.0
    """Seconds between later content chunks."""
    status: int | None = None
    """Answer with this HTTP error status and a provider-shaped JSON error body
    instead of a completion (429 also gets ``retry-after`` headers)."""
    stall_after: int | None = None
    """After this many content chunks send nothing more, keeping the connection
    open until the client goes away (or the server stops)."""
    drop_after: int | None = None
    """After this many content chunks abort the connection mid-stream, without
    the terminating events, so the client sees an incomplete body."""
    usage: tuple[int, int] = (12, 7)
    """Input and output tokens reported at the end."""
    retry_after: float = 0.01
    """Seconds advertised in ``retry-after-ms``/``retry-after`` on a 429, kept
    small so SDK retries in tests are fast."""

    @property
    def deltas(self) -> list[str]:
        """The content chunks, in order."""
        if isinstance(self.text, str):
            return _WORD.findall(self.text)
        return list(self.text)

    @property
    def full_text(self) -> str:
        """What a client should see once it has joined every delta."""
        return "".join(self.deltas)


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, and what became of it."""

    index: int
    path: str
    body: JSONObject
    """The request's parsed JSON body."""
    headers: dict[str, str]
    """Request headers, names lower-cased."""
    reply: Reply
    """The scripted reply that answered it."""
    started: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request arrived."""
    received_at: float = field(default_factory=time.time)
    """Wall-clock time (``time.time()``) when the request arrived."""
    ended: float | None = None
    """``time.monotonic()`` when the outcome was settled."""
    chunks_sent: int = 0
    """Content chunks handed to the server for sending."""
    outcome: Outcome = "open"

    @property
    def streaming(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return self.body.get("stream") is True


class _DropConnection(Exception):
    """Raised inside a streaming body so that uvicorn aborts the connection."""


class _QuietDrops(logging.Filter):
    """Hide uvicorn's "Exception in ASGI application" for deliberate drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _DropConnection)


_QUIET_DROPS = _QuietDrops()


class FakeLLMServer(ABC):
    """Provider-agnostic scripting, recording and lifecycle of a fake provider.

    Replies are served first in, first out; when the script runs out, every
    further request gets ``default`` (``Reply()`` unless given). Use it as
    ``async with Server(...) as fake:`` or call :meth:`start` and :meth:`stop`.
    Subclasses provide the route and the wire-format encoders.
    """

    route: ClassVar[str]
    """The endpoint path the provider SDK posts to."""
    api_prefix: ClassVar[str] = ""
    """What :attr:`base_url` adds to the server root (the SDK adds the rest)."""

    def __init__(self, *replies: Reply, default: Reply | None = None) -> None:
        self._script: deque[Reply] = deque(replies)
        self.default = default if default is not None else Reply()
        self.requests: list[RecordedRequest] = []
        self._root: str | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()

    # -- scripting and lifecycle ------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue more replies after those already scripted."""
        self._script.extend(replies)

    def reset(self, *replies: Reply, default: Reply | None = None) -> None:
        """Start over with a new script and no recorded requests, still serving.

        Lets one long-lived server (say, a module-scoped fixture) serve many
        tests without paying for a restart in each.
        """
        self._script = deque(replies)
        self.default = default if default is not None else Reply()
        self.requests = []

    @property
    def base_url(self) -> str:
        """The URL to give the provider SDK as its ``base_url``."""
        if self._root is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use 'async with' or start()")
        return self._root + self.api_prefix

    async def start(self) -> None:
        """Start serving on a free loopback port."""
        if self._exit_stack is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        app = Starlette(routes=[Route(self.route, self._handle, methods=["POST"])])
        stack = contextlib.AsyncExitStack()
        self._root = await stack.enter_async_context(serve_asgi(app))
        self._exit_stack = stack
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)

    async def stop(self) -> None:
        """Stop serving; streams still open (stalled ones too) are aborted."""
        if self._exit_stack is None:
            return
        self._stopping.set()
        stack, self._exit_stack = self._exit_stack, None
        try:
            await stack.aclose()
        finally:
            self._root = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- waiting ---------------------------------------------------------------
    # These take a ``timeout`` with a default, so a test cannot hang forever.

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 2.0, what: str = "condition"
    ) -> None:
        """Wait until ``predicate()`` is true; it is re-checked on every change
        to :attr:`requests`. Raises :class:`TimeoutError` after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    if predicate():
                        return
                    await changed.wait()
        except TimeoutError:
            seen = ", ".join(f"#{r.index}:{r.outcome}/{r.chunks_sent}" for r in self.requests)
            raise TimeoutError(
                f"{what} not met within {timeout}s; requests (outcome/chunks): [{seen}]"
            ) from None

    async def wait_for_requests(self, count: int, *, timeout: float = 2.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests have arrived; returns them all."""
        await self.wait_until(
            lambda: len(self.requests) >= count, timeout=timeout, what=f"{count} request(s)"
        )
        return list(self.requests)

    async def wait_for_outcome(
        self, index: int, outcome: Outcome, *, timeout: float = 2.0
    ) -> RecordedRequest:
        """Wait until request number ``index`` (from 0) has ``outcome`` and return it.

        Raises :class:`TimeoutError` if that does not happen within ``timeout``
        seconds, and :class:`AssertionError` at once if the request settles on a
        different outcome, so a wrong ending fails fast with a clear message.
        """

        def settled() -> bool:
            if len(self.requests) <= index:
                return False
            current = self.requests[index].outcome
            return current == outcome or current != "open"

        await self.wait_until(settled, timeout=timeout, what=f"request #{index} {outcome}")
        recorded = self.requests[index]
        if recorded.outcome != outcome:
            raise AssertionError(
                f"request #{index} ended as {recorded.outcome!r}, not {outcome!r}"
                f" (after {recorded.chunks_sent} content chunks)"
            )
        return recorded

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _settle(self, recorded: RecordedRequest, outcome: Outcome) -> None:
        if recorded.outcome == "open":
            recorded.outcome = outcome
            recorded.ended = time.monotonic()
            self._notify()

    # -- serving ---------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        body = await request.json()
        reply = self._script.popleft() if self._script else self.default
        recorded = RecordedRequest(
            index=len(self.requests),
            path=request.url.path,
            body=body if isinstance(body, dict) else {"_not_an_object": body},
            headers={name.lower(): value for name, value in request.headers.items()},
            reply=reply,
        )
        self.requests.append(recorded)
        self._notify()
        headers = self._response_headers(recorded)
        if reply.status is not None:
            if reply.status == 429:
                headers["retry-after-ms"] = str(round(reply.retry_after * 1000))
                headers["retry-after"] = str(round(reply.retry_after))
            self._settle(recorded, "error_status")
            return JSONResponse(self._error_body(reply.status), reply.status, headers)
        if not recorded.streaming:
            try:
                await self._pause(reply.ttft)
            except _DropConnection:  # the server is stopping
                self._settle(recorded, "dropped")
                raise
            self._settle(recorded, "completed")
            return JSONResponse(self._completion(recorded), headers=headers)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(
            self._stream(recorded), headers=headers, media_type="text/event-stream"
        )

    async def _stream(self, recorded: RecordedRequest) -> AsyncIterator[bytes]:
        """The SSE body: preamble at once, paced content, then the epilogue."""
        reply = recorded.reply
        try:
            for frame in self._stream_head(recorded):
                yield frame
            for n, delta in enumerate(reply.deltas):
                await self._gate(reply, n)
                await self._pause(reply.ttft if n == 0 else reply.chunk_delay)
                yield self._stream_delta(recorded, delta)
                recorded.chunks_sent += 1
                self._notify()
            await self._gate(reply, len(reply.deltas))
            for frame in self._stream_tail(recorded):
                yield frame
            self._settle(recorded, "completed")
        except _DropConnection:
            self._settle(recorded, "dropped")
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Starlette cancels the body when the client disconnects.
            self._settle(recorded, "client_disconnected")
            raise
        finally:
            self._settle(recorded, "dropped")  # any other failure also kills the stream

    async def _gate(self, reply: Reply, sent: int) -> None:
        """Apply ``drop_after`` / ``stall_after`` before content chunk ``sent``."""
        if reply.drop_after is not None and sent >= reply.drop_after:
            raise _DropConnection
        if reply.stall_after is not None and sent >= reply.stall_after:
            await self._pause(None)

    async def _pause(self, seconds: float | None) -> None:
        """Sleep (``None``: forever), but abort the stream if the server stops."""
        if seconds is not None and seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
                raise _DropConnection

    # -- provider hooks --------------------------------------------------------

    @abstractmethod
    def _response_headers(self, recorded: RecordedRequest) -> dict[str, str]:
        """Headers for any answer (request ids and the like)."""

    @abstractmethod
    def _error_body(self, status: int) -> JSONObject:
        """The JSON body of an error answer with ``status``."""

    @abstractmethod
    def _completion(self, recorded: RecordedRequest) -> JSONObject:
        """The JSON body of a non-streaming answer."""

    @abstractmethod
    def _stream_head(self, recorded: RecordedRequest) -> list[bytes]:
        """SSE frames sent before any content."""

    @abstractmethod
    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        """The SSE frame carrying one content chunk."""

    @abstractmethod
    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        """SSE frames that end a complete stream."""


def _sse(data: JSONObject | str, event: str | None = None) -> bytes:
    """Encode one Server-Sent Event the way the providers do (compact JSON)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


# -- OpenAI chat completions -----------------------------------------------------

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
        return [_sse(_openai_chunk(recorded, {"role": "assistant", "content": ""}, None))]

    def _stream_delta(self, recorded: RecordedRequest, text: str) -> bytes:
        return _sse(_openai_chunk(recorded, {"content": text}, None))

    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        frames = [_sse(_openai_chunk(recorded, {}, "stop"))]
        if _openai_wants_usage(recorded):
            usage_chunk = _openai_chunk(recorded, {}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _openai_usage(recorded.reply)
            frames.append(_sse(usage_chunk))
        frames.append(_sse("[DONE]"))
        return frames


# -- Anthropic messages ----------------------------------------------------------

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
    return _sse(data, data["type"])


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
