"""One response: the model speaks, calls tools, reads their results, speaks again.

Everything here happens under a single ``response_id``, which is what keeps the
caller from hearing silence while tools run: Retell holds the turn open until
``content_complete`` and asks for nothing else meanwhile. The loop:

1. stream a completion; its text is spoken as it arrives;
2. if it called tools: say a holding line if nothing has been said yet this
   turn, run the tools in parallel (a filler is spoken once if they take long),
   give the results back to the model, and go to 1 (at most ``max_tool_steps``
   rounds, after which the agent's fallback line ends the turn);
3. finish with one ``content_complete: true`` frame, carrying any call action a
   tool asked for (hang up, transfer, digits) on spoken content.

This module is the one place that decides when the caller hears the agent's
fallback line: whenever the turn cannot answer (the request could not be
built, the model failed or timed out, the tools looped), whatever the cause,
the line is spoken and the turn completes; the error itself goes to the log
and the turn's record, never to the caller. A response that runs on past
``max_response_chars`` or ``max_response_s`` (a model that never stops) is
cut there and completed cleanly.

After the turn's first frame, which always goes out the moment its text
arrives, deltas that come within ``frame_coalesce_ms`` of each other share a
frame: each frame costs a socket write and a WebSocket frame on both sides,
and a few tens of milliseconds on text that Retell's speech synthesis has not
reached yet cost the caller nothing.

Cancellation (the caller barged in, or a shutdown cut the turn) ends the loop
at once and sends nothing; :mod:`callbrain.tools.runner` decides which tools
keep running. :meth:`Turn.run` is therefore safe to cancel at any await.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from callbrain.agent import Agent
from callbrain.call.record import ModelRecord, ToolRecord, TurnRecord
from callbrain.llm.base import LLM, CompletionStream, LLMError
from callbrain.llm.chat import ChatChunk, ChatItem, ChatRequest, Message, TextDelta, ToolCall
from callbrain.retell.actions import TurnActions
from callbrain.tools.runner import ToolRun, ToolRunner

logger = logging.getLogger("callbrain.call")


class ResponseSender(Protocol):
    """Sends content for one response if it is still the live one (True if sent)."""

    def __call__(
        self, response_id: int, content: str, *, complete: bool, fields: dict[str, Any]
    ) -> Awaitable[bool]: ...


class _TooLong(Exception):
    """The response reached the agent's length or duration limit."""


class Turn:
    """Produces the whole response for one ``response_id``; use :meth:`run` once."""

    def __init__(
        self,
        *,
        record: TurnRecord,
        build_request: Callable[[], ChatRequest],
        anchor: int,
        agent: Agent,
        llm: LLM,
        runner: ToolRunner,
        send: ResponseSender,
        holding_line: Callable[[], str],
        open_first: Callable[[ChatRequest], CompletionStream] | None = None,
    ) -> None:
        """``open_first`` opens the first completion instead of ``llm.chat`` (an
        answer held since before the request, when it matches)."""
        self.record = record
        self.response_id = record.response_id
        self._build_request = build_request
        self.anchor = anchor
        """Transcript position the turn's tool calls are recorded at."""
        self.agent = agent
        self.llm = llm
        self.runner = runner
        self._send = send
        self._holding_line = holding_line
        self._open_first = open_first
        self.actions = TurnActions()
        self._failed = False
        self._filler_said = False
        self._deadline = record.arrived + agent.max_response_s

    async def run(self) -> None:
        """Speak the response and complete it, whatever happens (except cancellation)."""
        try:
            await self._steps()
        except _TooLong as exc:
            logger.warning("response %d cut short: %s", self.response_id, exc)
        except LLMError as exc:
            self._fail(f"model failed: {exc}")
            logger.warning("response %d: model failed: %s", self.response_id, exc)
        except Exception as exc:
            # CancelledError is not an Exception: a superseded turn ends silently here.
            self._fail(f"unexpected error: {type(exc).__name__}")
            logger.exception("response %d: unexpected error", self.response_id)
        await self._finish()

    def _fail(self, reason: str) -> None:
        self._failed = True
        self.record.error = self.record.error or reason

    async def _steps(self) -> None:
        request = self._build_request()
        messages: list[ChatItem] = list(request.messages)
        for step in range(self.agent.max_tool_steps + 1):
            text, calls = await self._complete(
                ChatRequest(request.system, tuple(messages), request.tools)
            )
            if not calls:
                return
            if step == self.agent.max_tool_steps:
                logger.warning(
                    "response %d: the model still calls tools after %d rounds; giving up",
                    self.response_id,
                    step,
                )
                self._fail(f"still calling tools after {step} rounds")
                return
            runs = await self._run_tools(calls)
            messages += [Message("assistant", text, tuple(calls)), *(run.output for run in runs)]
            if self.actions.action is not None:
                return  # hang up, transfer or digits: nothing more to say

    async def _complete(self, request: ChatRequest) -> tuple[str, list[ToolCall]]:
        """Stream one completion: speak its text, collect its tool calls."""
        text: list[str] = []
        calls: list[ToolCall] = []
        opener, self._open_first = self._open_first or self.llm.chat, None
        stream = opener(request)
        model = ModelRecord(self.llm.provider, self.llm.model, requested=stream.metrics.started)
        self.record.models.append(model)
        # The failover's own list, so a turn cut off later still reports those so far.
        model.failovers = stream.metrics.failovers
        frames = _Coalescer(self._say, self.agent.frame_coalesce_ms / 1000)
        try:
            async with stream:
                try:
                    await self._stream_into(stream, model, frames, text, calls)
                except Exception:
                    await frames.flush()  # the words that came before a failure are said
                    raise
                await frames.flush()
        finally:
            frames.close()
            _copy_metrics(stream, model)
            model.text = "".join(text)
        return "".join(text), calls

    async def _stream_into(
        self,
        stream: CompletionStream,
        model: ModelRecord,
        frames: _Coalescer,
        text: list[str],
        calls: list[ToolCall],
    ) -> None:
        first = await self._first_chunk(stream)
        if first is not None:
            model.first_token = time.perf_counter()
            # Who answered is known now (a failover has chosen): a barge-in may end
            # the turn's record before the stream's end copies it.
            model.provider, model.model = stream.metrics.provider, stream.metrics.model
        async for chunk in _chain(first, stream):
            if isinstance(chunk, ToolCall):
                calls.append(chunk)
            elif isinstance(chunk, TextDelta) and chunk.text:
                # Deltas of one completion join as they are ("Av" + "a", "I" + "'m");
                # only its first may need a space after what was said before it.
                now = self.record.first_frame is None  # never hold the first frame
                await frames.add(chunk.text, verbatim=bool(text), now=now)
                text.append(chunk.text)
                if (too_long := self._too_long(frames.held)) is not None:
                    await frames.flush()
                    raise _TooLong(too_long)

    def _too_long(self, held: int) -> str | None:
        """Why the response must stop here (its length with the ``held`` characters
        not sent yet, or its duration), or None."""
        length = len(self.record.spoken) + held
        if length >= self.agent.max_response_chars:
            return f"{length} characters (max_response_chars)"
        if time.perf_counter() >= self._deadline:
            return f"still speaking after {self.agent.max_response_s:g} s (max_response_s)"
        return None

    async def _first_chunk(self, stream: CompletionStream) -> ChatChunk | None:
        """The stream's first chunk; if it is late, the caller hears the filler once.

        The wait is a task, not a timeout around ``anext``: cancelling that would
        close the provider stream we still want to read.
        """
        wait = self.agent.first_token_filler_after_s
        nothing_said = not self.record.spoken.strip() and not self._filler_said
        if wait is None or not nothing_said or not self.agent.first_token_filler_message:
            return await anext(stream, None)
        pending = asyncio.ensure_future(anext(stream, None))
        try:
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                self._filler_said = True
                await self._say(self.agent.first_token_filler_message)
            return await pending
        finally:
            # If we are cancelled (a barge-in), the read must be over before the
            # stream is closed: closing a generator that is still being read fails.
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    async def _run_tools(self, calls: list[ToolCall]) -> list[ToolRun]:
        tools = [self.runner.tools.get(call.name) for call in calls]
        slow = [tool for tool in tools if tool is not None and not tool.instant]
        if slow and not self.record.spoken.strip():
            line = next((t.holding_message for t in slow if t.holding_message), None)
            if line is None and any(t.holding_message is None for t in slow):
                line = self._holding_line()
            if line:
                await self._say(line)
        started = time.perf_counter()
        records = [ToolRecord(call.name, call.arguments, started) for call in calls]
        self.record.tools += records
        batch = asyncio.ensure_future(self.runner.run_all(calls, self.actions, self.anchor))
        try:
            wait = self.agent.tool_filler_after_s
            if slow and wait is not None and not self._filler_said:
                done, _ = await asyncio.wait({batch}, timeout=wait)
                if not done and self.agent.tool_filler_message:
                    self._filler_said = True
                    await self._say(self.agent.tool_filler_message)
            runs = await batch
        finally:
            batch.cancel()  # no-op once done; stops read-only tools if we were cancelled
        for record, run in zip(records, runs, strict=True):
            record.duration_s = run.duration_s
            record.outcome = "replayed" if run.replayed else "ok" if run.successful else "error"
            record.result = run.output.content
            record.action = self.actions.by_tool.get(run.call.id)
        return runs

    async def _say(
        self, text: str, *, complete: bool = False, verbatim: bool = False, **fields: Any
    ) -> bool:
        """Send ``text``; a separate line (not ``verbatim``) gets a space before it
        if it would run into what was said."""
        spoken = self.record.spoken
        joins = text and spoken and not spoken[-1].isspace()
        if not verbatim and joins and not text[0].isspace():
            text = " " + text
        if self.actions.no_interruption_allowed:
            fields["no_interruption_allowed"] = True
        sent = await self._send(self.response_id, text, complete=complete, fields=fields)
        if sent:
            self.record.spoken += text
            if text.strip() and self.record.first_frame is None:
                self.record.first_frame = time.perf_counter()
        return sent

    async def _finish(self) -> None:
        line = self.agent.fallback_message if self._failed else ""
        fields: dict[str, Any] = {}
        action = self.actions.action
        if action is not None and not self._failed:
            line = action.line(spoke=bool(self.record.spoken.strip()))
            fields = action.frame_fields()
            self.record.action = action.kind
        if await self._say(line, complete=True, **fields):
            self.record.outcome = "fallback" if self._failed else "completed"
            self.record.completed = time.perf_counter()


class _Coalescer:
    """Sends a completion's deltas, joining those that arrive within ``window_s``
    of the first one held into one frame (see the module docstring)."""

    MAX_HELD = 200
    """Characters held at most, however fast the deltas come (a buffered stream
    yields many without a pause)."""

    def __init__(self, say: Callable[..., Awaitable[bool]], window_s: float) -> None:
        self._say = say
        self._window_s = window_s
        self._pending: list[str] = []
        self.held = 0
        """Characters held, not sent yet."""
        self._verbatim = False
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    async def add(self, text: str, *, verbatim: bool, now: bool) -> None:
        """Send ``text``, now or with the next deltas (``now``: the turn's first words)."""
        if self._flushing is not None:
            await self._flushing  # the timer's frame goes first: the order is the text's
        if not self._pending:
            self._verbatim = verbatim
        self._pending.append(text)
        self.held += len(text)
        if now or self._window_s <= 0 or self.held >= self.MAX_HELD:
            await self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._window_s, self._on_timer)

    async def flush(self) -> None:
        """Send what is held, now."""
        if self._flushing is not None:
            await self._flushing
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            text, self._pending, self.held = "".join(self._pending), [], 0
            await self._say(text, verbatim=self._verbatim)

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_held())

    async def _flush_held(self) -> None:
        try:
            text, self._pending, self.held = "".join(self._pending), [], 0
            await self._say(text, verbatim=self._verbatim)
        finally:
            self._flushing = None

    def close(self) -> None:
        """Drop what is held (the turn is over or cut off)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._flushing is not None:
            self._flushing.cancel()
        self._pending, self.held = [], 0


def _copy_metrics(stream: CompletionStream, model: ModelRecord) -> None:
    metrics = stream.metrics
    model.provider, model.model = metrics.provider, metrics.model
    model.failovers = list(metrics.failovers)
    model.outcome = metrics.outcome
    model.duration_s = metrics.duration_s
    if metrics.usage is not None:
        model.input_tokens = metrics.usage.input_tokens
        model.output_tokens = metrics.usage.output_tokens


async def _chain(first: ChatChunk | None, stream: CompletionStream) -> AsyncIterator[ChatChunk]:
    """``first`` (if any), then the rest of ``stream``."""
    if first is None:
        return
    yield first
    async for chunk in stream:
        yield chunk
