"""Drive a :class:`~callbrain.call.session.CallSession` frame by frame, with no socket.

The loopback tests (a real uvicorn, a real SDK against a fake provider) prove
the wire behaviour, but they reach the error paths inside a turn only by luck:
a tool that raises at the worst moment, a frame that cannot be built, a store
that hangs, a socket reset in the middle of a tool. Here a test holds every
piece:

* :class:`FakeTransport` is the socket: the test pushes Retell's frames in,
  reads the session's frames out (waiting on each, never sleeping), and can
  hang up politely or reset the connection abruptly;
* :class:`ScriptedLLM` is the model: each request gets the next script, whose
  steps are text, tool calls, a gate the test opens when it wants the model to
  go on, or an exception to raise;
* :func:`session` runs a real ``CallSession`` on both and stops it cleanly.

::

    llm = ScriptedLLM(["Hello", " there."])
    async with session(agent, llm) as (call, wire):
        await wire.expect("config")
        wire.push(request(1, "Hi"))
        frames = await wire.until_complete(1)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from callbrain.agent import Agent
from callbrain.call.record import CallObserver, Observers
from callbrain.call.session import CallSession
from callbrain.llm.base import LLM
from callbrain.llm.chat import ChatChunk, ChatRequest, TextDelta, ToolCall, Usage
from callbrain.stores.guard import GuardedStore
from callbrain.tools.runner import Toolbox

Frame = dict[str, Any]
ScriptStep = str | ChatChunk | asyncio.Event | BaseException
"""Text to stream, a chunk, a gate to wait for, or an exception to raise."""


class FakeTransport:
    """An in-memory socket (the session's :class:`~callbrain.call.session.Transport`)."""

    def __init__(self) -> None:
        self.sent: list[Frame] = []
        """Every frame the session wrote, parsed, in order."""
        self.close_code: int | None = None
        self.closed_by_server: int | None = None
        """The code the session closed with, if it did."""
        self.fail_sends = False
        """Make every write raise, as a socket that died under the session."""
        self.server_closed = asyncio.Event()
        """Set when the session closes the socket itself."""
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._read = 0

    # ------------------------------------------------------------- the session's side

    async def receive(self) -> str | bytes | None:
        return await self._inbox.get()

    async def send_text(self, text: str) -> None:
        if self.fail_sends:
            raise ConnectionResetError("connection reset by peer")
        self.sent.append(orjson.loads(text))
        self._changed.set()

    async def close(self, code: int) -> None:
        self.closed_by_server = code
        self.server_closed.set()
        self._inbox.put_nowait(None)
        self._changed.set()

    # ------------------------------------------------------------------ the test's side

    def push(self, frame: Frame | str | bytes) -> None:
        """Deliver one frame from Retell (a dict is sent as JSON text)."""
        self._inbox.put_nowait(orjson.dumps(frame).decode() if isinstance(frame, dict) else frame)

    def hang_up(self, code: int = 1000) -> None:
        """Retell closes the socket politely (nothing happens if it is already closed)."""
        if self.close_code is None:
            self.close_code = code
            self._inbox.put_nowait(None)

    def reset(self) -> None:
        """The connection dies abruptly: no close frame, and writes fail from now on."""
        if self.close_code is None:
            self.close_code = 1006
            self.fail_sends = True
            self._inbox.put_nowait(None)

    async def next(self, timeout: float = 5.0) -> Frame:
        """The next frame the session writes (frames are read in order, once)."""
        async with asyncio.timeout(timeout):
            while self._read >= len(self.sent):
                self._changed.clear()
                await self._changed.wait()
        frame = self.sent[self._read]
        self._read += 1
        return frame

    async def expect(self, response_type: str, timeout: float = 5.0) -> Frame:
        """Skip to the next frame of ``response_type`` (pongs and others pass by)."""
        while True:
            frame = await self.next(timeout)
            if frame.get("response_type") == response_type:
                return frame

    async def until_complete(self, response_id: int, timeout: float = 5.0) -> list[Frame]:
        """The frames up to and including ``response_id``'s ``content_complete``."""
        frames: list[Frame] = []
        while True:
            frame = await self.next(timeout)
            frames.append(frame)
            if frame.get("response_id") == response_id and frame.get("content_complete"):
                return frames

    def responses(self, response_id: int) -> list[Frame]:
        """Every ``response`` frame sent so far for ``response_id``."""
        return [
            f
            for f in self.sent
            if f.get("response_type") == "response" and f.get("response_id") == response_id
        ]

    def said(self, response_id: int) -> str:
        return "".join(f["content"] for f in self.responses(response_id))


class ScriptedLLM(LLM):
    """A model that answers each request with the next script (see ``ScriptStep``).

    ``requests`` holds what it was asked; ``closed`` counts streams that were
    closed before they finished (a barge-in closes the provider stream at once).
    A request beyond the scripts gets ``default``.
    """

    provider = "scripted"

    def __init__(
        self, *scripts: Sequence[ScriptStep], default: Sequence[ScriptStep] = ("OK.",)
    ) -> None:
        super().__init__(model="script")
        self.scripts = list(scripts)
        self.default = list(default)
        self.requests: list[ChatRequest] = []
        self.closed = 0
        self.started = asyncio.Event()
        """Set when a request arrives (clear it to wait for the next one)."""
        self.finished = asyncio.Event()
        """Set when a script has been streamed to its end (clear it to wait again)."""

    async def _generate(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        self.requests.append(request)
        self.started.set()
        script = self.scripts.pop(0) if self.scripts else self.default
        finished = False
        try:
            for step in script:
                if isinstance(step, asyncio.Event):
                    await step.wait()
                elif isinstance(step, BaseException):
                    raise step
                elif isinstance(step, str):
                    yield TextDelta(step)
                else:
                    yield step
            finished = True
            self.finished.set()
        finally:
            if not finished:
                self.closed += 1


def tool_call(name: str, arguments: str = "{}", call_id: str | None = None) -> ToolCall:
    """A scripted tool call (ids default to ``call_<name>``)."""
    return ToolCall(call_id or f"call_{name}", name, arguments)


def usage(input_tokens: int, output_tokens: int) -> Usage:
    return Usage(input_tokens, output_tokens)


def request(
    response_id: int,
    text: str = "Hello?",
    *,
    transcript: list[Frame] | None = None,
    reminder: bool = False,
) -> Frame:
    """A ``response_required`` (or ``reminder_required``) frame."""
    return {
        "interaction_type": "reminder_required" if reminder else "response_required",
        "response_id": response_id,
        "transcript": transcript if transcript is not None else [{"role": "user", "content": text}],
    }


def ping(timestamp: int) -> Frame:
    return {"interaction_type": "ping_pong", "timestamp": timestamp}


@contextlib.asynccontextmanager
async def session(
    agent: Agent,
    llm: LLM,
    *,
    call_id: str = "call-1",
    transport: FakeTransport | None = None,
    store: GuardedStore | None = None,
    toolbox: Toolbox | None = None,
    observers: Sequence[CallObserver] = (),
    on_end: Callable[[CallSession], None] | None = None,
) -> AsyncIterator[tuple[CallSession, FakeTransport]]:
    """Run a real :class:`CallSession` on a :class:`FakeTransport` until the block
    ends; then hang up (if the test did not) and wait for the session to finish.
    An exception from the session's task is raised here."""
    wire = transport or FakeTransport()
    call = CallSession(
        agent,
        llm,
        wire,
        call_id,
        store=store,
        toolbox=toolbox,
        observers=Observers(list(observers)),
    )
    task = asyncio.create_task(call.run(), name=f"session-{call_id}")
    try:
        yield call, wire
    finally:
        wire.hang_up()
        await task
        if on_end is not None:
            on_end(call)
