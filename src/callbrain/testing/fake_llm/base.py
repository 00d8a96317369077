"""The provider-agnostic part of the fake LLM servers: scripting, recording and
serving (the script's types are in :mod:`.script`); each provider module adds
its wire format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import ClassVar, Self

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from callbrain.testing.fake_llm.script import (
    FakeToolCall,
    JSONObject,
    Outcome,
    RecordedRequest,
    Reply,
    ReplyFunction,
)
from callbrain.testing.serve import serve_asgi

_ORJSON = orjson.OPT_NON_STR_KEYS
"""Like ``json.dumps``, which turns non-string keys of scripted arguments into strings."""

__all__ = [
    "FakeLLMServer",
    "FakeToolCall",
    "JSONObject",
    "Outcome",
    "RecordedRequest",
    "Reply",
    "ReplyFunction",
    "sse",
]


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
    further request gets ``default`` (``Reply()`` unless given), or, when
    ``default`` is a :data:`ReplyFunction`, whatever it returns for that
    request (a reply that depends on the conversation, or a random mix of
    failures for a load test). Use it as ``async with Server(...) as fake:`` or
    call :meth:`start` and :meth:`stop`; it listens on ``host`` and ``port``
    (``0``: a free port). Subclasses provide the route and the wire-format
    encoders.

    ``record=False`` keeps :attr:`requests` empty, so a long-running fake (the
    ``callbrain fake-llm`` command) does not grow with every request it
    serves. :attr:`received` and :attr:`outcomes` still count them, and
    :meth:`wait_until` can wait on those counts; the ``wait_for_*`` helpers
    look at :attr:`requests`, so they are of no use then.
    """

    route: ClassVar[str]
    """The endpoint path the provider SDK posts to."""
    api_prefix: ClassVar[str] = ""
    """What :attr:`base_url` adds to the server root (the SDK adds the rest)."""

    def __init__(
        self,
        *replies: Reply,
        default: Reply | ReplyFunction | None = None,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._script: deque[Reply] = deque(replies)
        self.default: Reply | ReplyFunction = default if default is not None else Reply()
        self.record = record
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.received = 0
        """Requests received since the start (or the last :meth:`reset`), recorded or not."""
        self.outcomes: Counter[Outcome] = Counter()
        """How many requests ended each way (open ones are not counted yet)."""
        self._root: str | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._stopping = False
        self._sleepers: set[asyncio.Future[None]] = set()
        """The pauses in progress, for :meth:`abort_streams` to cut short."""
        self._changed = asyncio.Event()
        self._watchers = 0
        """How many :meth:`wait_until` calls are waiting on ``_changed``."""

    # -- scripting and lifecycle ------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue more replies after those already scripted."""
        self._script.extend(replies)

    def reset(self, *replies: Reply, default: Reply | ReplyFunction | None = None) -> None:
        """Start over with a new script, no recorded requests and zero counts,
        still serving.

        Lets one long-lived server (say, a module-scoped fixture) serve many
        tests without paying for a restart in each.
        """
        self._script = deque(replies)
        self.default = default if default is not None else Reply()
        self.requests = []
        self.received = 0
        self.outcomes = Counter()

    @property
    def base_url(self) -> str:
        """The URL to give the provider SDK as its ``base_url``."""
        if self._root is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use 'async with' or start()")
        return self._root + self.api_prefix

    def asgi_app(self) -> Starlette:
        """The fake as an ASGI app, for a server run some other way than
        :meth:`start` (``callbrain fake-llm`` runs uvicorn as the process's
        server). That server should call :meth:`abort_streams` as it begins to
        shut down, or stalled streams hold it up until its graceful timeout."""
        # Deliberate drops would each log a traceback as "Exception in ASGI application".
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)
        return Starlette(routes=[Route(self.route, self._handle, methods=["POST"])])

    def abort_streams(self) -> None:
        """Abort every stream waiting on its script (a ttft, a chunk delay or a
        stall), now and from now on; :meth:`stop` does this first."""
        self._stopping = True
        for waiter in self._sleepers:
            _wake(waiter)

    async def start(self) -> None:
        """Start serving on ``host`` and ``port`` in the running event loop."""
        if self._exit_stack is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stopping = False
        self._changed = asyncio.Event()
        app = self.asgi_app()
        stack = contextlib.AsyncExitStack()
        self._root = await stack.enter_async_context(
            serve_asgi(app, host=self.host, port=self.port)
        )
        self._exit_stack = stack

    async def stop(self) -> None:
        """Stop serving; streams still open (stalled ones too) are aborted."""
        if self._exit_stack is None:
            return
        self.abort_streams()
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
        (a request arriving, a chunk sent, an outcome settled). Raises
        :class:`TimeoutError` after ``timeout`` s."""
        self._watchers += 1
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
        finally:
            self._watchers -= 1

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
        # Called for every content chunk: with nobody in wait_until (always so
        # in a load test) skip making a new Event each time.
        if self._watchers:
            self._changed.set()
            self._changed = asyncio.Event()

    def _settle(self, recorded: RecordedRequest, outcome: Outcome) -> None:
        if recorded.outcome == "open":
            recorded.outcome = outcome
            recorded.ended = time.monotonic()
            self.outcomes[outcome] += 1
            self._notify()

    # -- serving ---------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        raw = await request.json()
        body: JSONObject = raw if isinstance(raw, dict) else {"_not_an_object": raw}
        recorded = RecordedRequest(
            index=self.received,
            path=request.url.path,
            body=body,
            headers={name.lower(): value for name, value in request.headers.items()},
            reply=self._reply_for(body),
            client=f"{request.client.host}:{request.client.port}" if request.client else "",
        )
        self.received += 1
        if self.record:
            self.requests.append(recorded)
        self._notify()
        reply = recorded.reply
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

    def _reply_for(self, body: JSONObject) -> Reply:
        if self._script:
            return self._script.popleft()
        if isinstance(self.default, Reply):
            return self.default
        return self.default(body)

    async def _stream(self, recorded: RecordedRequest) -> AsyncIterator[bytes]:
        """The SSE body: preamble at once, paced content, then the epilogue."""
        reply = recorded.reply
        try:
            for frame in self._stream_head(recorded):
                yield frame
            items = reply.items
            for n, item in enumerate(items):
                await self._gate(reply, n)
                if n == reply.malformed_after:
                    yield self._stream_malformed(recorded)
                await self._pause(reply.ttft if n == 0 else reply.chunk_delay)
                if isinstance(item, str):
                    yield self._stream_delta(recorded, item)
                else:
                    for frame in self._stream_tool_call(recorded, n - len(reply.deltas), item):
                        yield frame
                recorded.chunks_sent += 1
                self._notify()
            await self._gate(reply, len(items))
            if reply.malformed_after is not None and reply.malformed_after >= len(items):
                yield self._stream_malformed(recorded)
            for frame in self._stream_tail(recorded)[: reply.ending_events]:
                yield frame
            if reply.hold_open:
                await self._pause(None)
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
        """Sleep (``None``: forever), but abort the stream if the server stops.

        A bare future and timer, like ``asyncio.sleep``, that
        :meth:`abort_streams` can resolve early: this runs before every content
        chunk, and ``asyncio.timeout`` around an ``Event.wait`` costs several
        times more (each expiry cancels the task and raises through it).
        """
        if seconds is not None and seconds <= 0:
            return
        if self._stopping:
            raise _DropConnection
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _wake, waiter)
        self._sleepers.add(waiter)
        try:
            await waiter
        finally:
            self._sleepers.discard(waiter)
            if timer is not None:
                timer.cancel()
        if self._stopping:
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

    @abstractmethod
    def _stream_malformed(self, recorded: RecordedRequest) -> bytes:
        """An SSE frame of the format whose JSON data is cut off mid-object."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def sse(data: JSONObject | str, event: str | None = None) -> bytes:
    """Encode one Server-Sent Event the way the providers do (compact JSON, as
    UTF-8). orjson: this runs for every content chunk, and the stdlib encoder
    was a large share of the fake's CPU time under load."""
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data, option=_ORJSON)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + b"\n\n"
