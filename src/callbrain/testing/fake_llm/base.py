"""The provider-agnostic part of the fake LLM servers: the script, the
recording and the serving; each provider module adds its wire format."""

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

Outcome = Literal["open", "completed", "client_disconnected", "dropped", "error_status"]
"""How a recorded request ended; ``"open"`` while it is still being answered."""

JSONObject = dict[str, Any]

_WORD = re.compile(r"\s*\S+\s*$|\s*\S+|\s+")


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call for a :class:`Reply` to make, after its text.

    ``arguments`` as a dict is sent as JSON; as a string it is sent verbatim, so
    a test can script malformed arguments. ``id`` defaults to a provider-shaped
    id that is unique per request and position.
    """

    name: str
    arguments: str | dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def arguments_text(self) -> str:
        """The arguments as the wire carries them."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass
class Reply:
    """One scripted completion: what to say, how fast, and how to fail.

    ``text`` as a ``str`` is split into word-sized deltas that keep their
    spaces (``"".join(reply.deltas) == text``); a sequence gives the exact
    deltas. A "content chunk" below is one such delta on the wire.
    """

    text: str | Sequence[str] = "OK."
    tool_calls: Sequence[FakeToolCall] = ()
    """Tool calls made after the text, in order (several make a parallel call).
    Each counts as one content chunk for ``ttft``, ``chunk_delay``,
    ``stall_after`` and ``drop_after``."""
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

    @property
    def items(self) -> list[str | FakeToolCall]:
        """Every content chunk in sending order: text deltas, then tool calls."""
        return [*self.deltas, *self.tool_calls]


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
            items = reply.items
            for n, item in enumerate(items):
                await self._gate(reply, n)
                await self._pause(reply.ttft if n == 0 else reply.chunk_delay)
                if isinstance(item, str):
                    yield self._stream_delta(recorded, item)
                else:
                    for frame in self._stream_tool_call(recorded, n - len(reply.deltas), item):
                        yield frame
                recorded.chunks_sent += 1
                self._notify()
            await self._gate(reply, len(items))
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
    def _stream_tool_call(
        self, recorded: RecordedRequest, position: int, call: FakeToolCall
    ) -> list[bytes]:
        """The SSE frames carrying tool call number ``position`` (from 0) of the reply."""

    @abstractmethod
    def _stream_tail(self, recorded: RecordedRequest) -> list[bytes]:
        """SSE frames that end a complete stream."""


def sse(data: JSONObject | str, event: str | None = None) -> bytes:
    """Encode one Server-Sent Event the way the providers do (compact JSON)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
