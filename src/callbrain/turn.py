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

Failures end the same way: the caller hears the fallback line, the turn
completes. Cancellation (the caller barged in) ends the loop at once and sends
nothing; :mod:`callbrain.tools.runner` decides which tools keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from callbrain.agent import Agent
from callbrain.call_control import TurnActions
from callbrain.llm.base import LLM, LLMError, LLMStream
from callbrain.llm.chat import ChatChunk, ChatItem, ChatRequest, Message, TextDelta, ToolCall
from callbrain.tools.runner import ToolRun, ToolRunner

logger = logging.getLogger("callbrain.session")


class ResponseSender(Protocol):
    """Sends content for one response if it is still the live one (True if sent)."""

    def __call__(
        self, response_id: int, content: str, *, complete: bool, fields: dict[str, Any]
    ) -> Awaitable[bool]: ...


@dataclass
class TurnReport:
    """What the turn did, for the session's log line."""

    first_text: float | None = None
    tool_calls: int = 0
    failed: bool = False
    action: str | None = None


class Turn:
    """Produces the whole response for one ``response_id``; use :meth:`run` once."""

    def __init__(
        self,
        *,
        response_id: int,
        request: ChatRequest,
        anchor: int,
        agent: Agent,
        llm: LLM,
        runner: ToolRunner,
        send: ResponseSender,
        holding_line: Callable[[], str],
    ) -> None:
        self.response_id = response_id
        self.request = request
        self.anchor = anchor
        """Transcript position the turn's tool calls are recorded at."""
        self.agent = agent
        self.llm = llm
        self.runner = runner
        self._send = send
        self._holding_line = holding_line
        self.actions = TurnActions()
        self.report = TurnReport()
        self._spoken = ""
        self._filler_said = False

    async def run(self) -> None:
        """Speak the response and complete it, whatever happens (except cancellation)."""
        try:
            await self._steps()
        except LLMError as exc:
            self.report.failed = True
            logger.warning("response %d: model failed: %s", self.response_id, exc)
        except Exception:
            # CancelledError is not an Exception: a superseded turn ends silently here.
            self.report.failed = True
            logger.exception("response %d: unexpected error", self.response_id)
        await self._finish()

    async def _steps(self) -> None:
        messages: list[ChatItem] = list(self.request.messages)
        for step in range(self.agent.max_tool_steps + 1):
            request = ChatRequest(self.request.system, tuple(messages), self.request.tools)
            text, calls = await self._complete(request)
            if not calls:
                return
            if step == self.agent.max_tool_steps:
                logger.warning(
                    "response %d: the model still calls tools after %d rounds; giving up",
                    self.response_id,
                    step,
                )
                self.report.failed = True
                return
            runs = await self._run_tools(calls)
            messages += [Message("assistant", text, tuple(calls)), *(run.output for run in runs)]
            if self.actions.action is not None:
                return  # hang up, transfer or digits: nothing more to say

    async def _complete(self, request: ChatRequest) -> tuple[str, list[ToolCall]]:
        """Stream one completion: speak its text, collect its tool calls."""
        text: list[str] = []
        calls: list[ToolCall] = []
        async with self.llm.chat(request) as stream:
            first = await self._first_chunk(stream)
            async for chunk in _chain(first, stream):
                if isinstance(chunk, ToolCall):
                    calls.append(chunk)
                elif isinstance(chunk, TextDelta) and chunk.text:
                    # Deltas of one completion join as they are ("Av" + "a", "I" + "'m");
                    # only its first may need a space after what was said before it.
                    sent = await self._say(chunk.text, verbatim=bool(text))
                    text.append(chunk.text)
                    if sent and self.report.first_text is None:
                        self.report.first_text = time.perf_counter()
        return "".join(text), calls

    async def _first_chunk(self, stream: LLMStream) -> ChatChunk | None:
        """The stream's first chunk; if it is late, the caller hears the filler once.

        The wait is a task, not a timeout around ``anext``: cancelling that would
        close the provider stream we still want to read.
        """
        wait = self.agent.first_token_filler_after_s
        nothing_said = not self._spoken.strip() and not self._filler_said
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
        self.report.tool_calls += len(calls)
        tools = [self.runner.tools.get(call.name) for call in calls]
        slow = [tool for tool in tools if tool is not None and not tool.instant]
        if slow and not self._spoken.strip():
            line = next((t.holding_message for t in slow if t.holding_message), None)
            if line is None and any(t.holding_message is None for t in slow):
                line = self._holding_line()
            if line:
                await self._say(line)
        batch = asyncio.ensure_future(self.runner.run_all(calls, self.actions, self.anchor))
        try:
            wait = self.agent.tool_filler_after_s
            if slow and wait is not None and not self._filler_said:
                done, _ = await asyncio.wait({batch}, timeout=wait)
                if not done and self.agent.tool_filler_message:
                    self._filler_said = True
                    await self._say(self.agent.tool_filler_message)
            return await batch
        finally:
            batch.cancel()  # no-op once done; stops read-only tools if we were cancelled

    async def _say(
        self, text: str, *, complete: bool = False, verbatim: bool = False, **fields: Any
    ) -> bool:
        """Send ``text``; a separate line (not ``verbatim``) gets a space before it
        if it would run into what was said."""
        joins = text and self._spoken and not self._spoken[-1].isspace()
        if not verbatim and joins and not text[0].isspace():
            text = " " + text
        if self.actions.no_interruption_allowed:
            fields["no_interruption_allowed"] = True
        sent = await self._send(self.response_id, text, complete=complete, fields=fields)
        if sent:
            self._spoken += text
        return sent

    async def _finish(self) -> None:
        line = self.agent.fallback_message if self.report.failed else ""
        fields: dict[str, Any] = {}
        action = self.actions.action
        if action is not None and not self.report.failed:
            line = action.line(spoke=bool(self._spoken.strip()))
            fields = action.frame_fields()
            self.report.action = action.kind
        await self._say(line, complete=True, **fields)


async def _chain(first: ChatChunk | None, stream: LLMStream) -> AsyncIterator[ChatChunk]:
    """``first`` (if any), then the rest of ``stream``."""
    if first is None:
        return
    yield first
    async for chunk in stream:
        yield chunk
