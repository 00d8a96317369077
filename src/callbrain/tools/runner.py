"""Run the model's tool calls: validated, timed out, idempotent, reported to Retell.

One :class:`ToolRunner` serves every turn of a call. For each call the model
makes it sends ``tool_call_invocation``, parses and validates the arguments,
runs the tool under its timeout and sends ``tool_call_result`` with
``successful``. Whatever goes wrong (an unknown tool, unreadable arguments, a
:class:`~callbrain.tools.ToolError`, a timeout, a crash) becomes an error result
that the model reads and can recover from; nothing escapes to the turn.

Cancellation is where tools differ. When the caller barges in, the turn that
asked is cancelled, and so is a read-only tool still running for it: its answer
is no longer wanted. A side-effecting tool is *not* cancelled: stopping a
booking half-way leaves nobody knowing whether it happened. It runs to the end
in the background, its result is stored under its idempotency key and recorded
in the call's history, and a newer turn that asks for the same thing waits for
that run instead of starting a second one.

The result store may fail or hang (Redis paused, say); its guard bounds and
absorbs that (:mod:`callbrain.stores.guard`). A result that could not be
stored is still returned to the model, reported to Retell and kept in the
call's own history, and this call will not run the same thing again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from callbrain.call.control import CallControl
from callbrain.llm.chat import ToolCall, ToolOutput
from callbrain.retell.actions import TurnActions
from callbrain.retell.frames import OutboundFrame, ToolCallInvocationFrame, ToolCallResultFrame
from callbrain.stores.guard import GuardedStore
from callbrain.stores.memory import MemoryStore
from callbrain.tools.arguments import parse_arguments
from callbrain.tools.base import Tool, ToolContext, ToolError, result_text
from callbrain.tools.idempotency import ResultStore, StoredResult, idempotency_key

logger = logging.getLogger("callbrain.tools")

REPLAY_NOTE = (
    " (This was already done earlier in this call with the same details; it was not repeated.)"
)


@dataclass(slots=True)
class Toolbox:
    """What the calls of one server share: the tools, the idempotency store, and
    the side-effecting runs in progress.

    Runs in progress are shared, not per socket, because Retell reconnects a
    dropped call on a new socket: a booking still running for the old socket
    must answer the same request made on the new one, not run a second time.
    """

    tools: Mapping[str, Tool]
    store: ResultStore = field(
        default_factory=lambda: ResultStore(GuardedStore(MemoryStore(), ttl_s=6 * 3600))
    )
    inflight: dict[str, asyncio.Task[tuple[StoredResult, bool]]] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Wait for side-effecting runs still in flight, then release the tools."""
        if self.inflight:
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)
        for tool in self.tools.values():
            await tool.aclose()


@dataclass(frozen=True, slots=True)
class ToolRun:
    """One tool call and its outcome, as the model will see it."""

    call: ToolCall
    output: ToolOutput
    replayed: bool = False
    duration_s: float = 0.0

    @property
    def successful(self) -> bool:
        return not self.output.is_error


class ToolRunner:
    """Runs tool calls for one call; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        toolbox: Toolbox,
        control: CallControl,
        send: Callable[[OutboundFrame], Awaitable[bool]],
        record: Callable[[ToolRun, int], None],
    ) -> None:
        """``send`` writes a frame if the call is connected; ``record(run, anchor)``
        adds a finished run to the call's history at transcript position ``anchor``."""
        self.tools = toolbox.tools
        self._store = toolbox.store
        self._inflight = toolbox.inflight
        self._control = control
        self._send = send
        self._record = record
        self._mine: set[asyncio.Task[tuple[StoredResult, bool]]] = set()
        self._done: dict[str, StoredResult] = {}
        """This call's side-effecting results by key: the answer to a repeat even
        when the store could not keep them."""

    async def run_all(
        self, calls: Sequence[ToolCall], turn: TurnActions, anchor: int
    ) -> list[ToolRun]:
        """Run one message's calls in parallel; results in the calls' order."""
        return list(await asyncio.gather(*(self._run(call, turn, anchor) for call in calls)))

    async def _run(self, call: ToolCall, turn: TurnActions, anchor: int) -> ToolRun:
        started = time.perf_counter()
        await self._send(
            ToolCallInvocationFrame(tool_call_id=call.id, name=call.name, arguments=call.arguments)
        )
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            message = f"Error: there is no tool named {call.name!r} (tools: {known})."
            return await self._finish(call, StoredResult(message, False), anchor, started)
        context = ToolContext(
            call_id=self._control.call_id,
            tool_call_id=call.id,
            variables=self._control.variables,
            call=self._control,
            turn=turn,
        )
        try:
            arguments = tool.validate(parse_arguments(call.arguments))
        except ToolError as exc:
            message = f"Error: invalid arguments for {tool.name}: {exc}"
            return await self._finish(call, StoredResult(message, False), anchor, started)
        if not tool.side_effects:
            result = await _execute(tool, arguments, context)
            return await self._finish(call, result, anchor, started)
        key = idempotency_key(context.call_id, tool.name, arguments)
        done = self._done.get(key)
        if done is not None:
            return await self._finish(call, done, anchor, started, replayed=True)
        # Joined before any await, so two calls racing for one key share one run.
        task = self._inflight.get(key)
        owner = task is None
        if task is None:
            task = asyncio.create_task(
                self._run_side_effect(tool, call, arguments, context, anchor, key),
                name=f"tool-{tool.name}-{call.id}",
            )
            self._inflight[key] = task
            self._mine.add(task)
            task.add_done_callback(self._mine.discard)
        else:
            logger.info("%s: same arguments as a run in progress; waiting for it", tool.name)
        # shield: a barge-in cancels the turn waiting here, not the tool.
        result, ran = await asyncio.shield(task)
        if owner and ran:
            # The run recorded and reported itself.
            return _run_of(call, result, duration_s=time.perf_counter() - started)
        return await self._finish(call, result, anchor, started, replayed=True)

    async def _run_side_effect(
        self,
        tool: Tool,
        call: ToolCall,
        arguments: dict[str, Any],
        context: ToolContext,
        anchor: int,
        key: str,
    ) -> tuple[StoredResult, bool]:
        """The stored result (False), or the one real run's (True). A real run
        records and reports itself, as the turn that asked may be gone by now."""
        try:
            stored = await self._store.get(key)
            if stored is not None:
                self._done[key] = stored
                return stored, False
            started = time.perf_counter()
            result = await _execute(tool, arguments, context)
            # Failures are not kept: the caller may ask to try again.
            if result.successful:
                self._done[key] = result
                if not await self._store.put(key, result):
                    logger.warning(
                        "%s: its result could not be stored (kept in this call's history)",
                        tool.name,
                    )
            await self._finish(call, result, anchor, started)
            return result, True
        finally:
            self._inflight.pop(key, None)

    async def _finish(
        self,
        call: ToolCall,
        result: StoredResult,
        anchor: int,
        started: float,
        *,
        replayed: bool = False,
    ) -> ToolRun:
        """Log, record in the call's history and report to Retell."""
        run = _run_of(call, result, replayed=replayed, duration_s=time.perf_counter() - started)
        logger.info(
            "tool %s (%s) %s in %.0f ms%s",
            call.name,
            call.id,
            "ok" if result.successful else "failed",
            (time.perf_counter() - started) * 1000,
            " (stored result of an earlier run)" if replayed else "",
        )
        if not result.successful:
            logger.info("tool %s result: %s", call.name, result.content)
        self._record(run, anchor)
        await self._send(
            ToolCallResultFrame(
                tool_call_id=call.id, content=run.output.content, successful=result.successful
            )
        )
        return run

    async def aclose(self) -> None:
        """Wait for this call's side-effecting runs still in flight (never cut short)."""
        if self._mine:
            await asyncio.gather(*self._mine, return_exceptions=True)


def _run_of(
    call: ToolCall, result: StoredResult, *, replayed: bool = False, duration_s: float = 0.0
) -> ToolRun:
    note = REPLAY_NOTE if replayed and result.successful else ""
    content = result.content + note
    output = ToolOutput(call.id, call.name, content, not result.successful)
    return ToolRun(call, output, replayed, duration_s)


async def _execute(tool: Tool, arguments: dict[str, Any], context: ToolContext) -> StoredResult:
    try:
        async with asyncio.timeout(tool.timeout_s):
            value = await tool.run(arguments, context)
    except ToolError as exc:
        return StoredResult(f"Error: {exc}", False)
    except TimeoutError:
        what = " It may or may not have taken effect." if tool.side_effects else ""
        return StoredResult(
            f"Error: {tool.name} did not finish within {tool.timeout_s:g} seconds.{what}", False
        )
    except Exception:
        # The details are for the logs; the model only needs to know it failed.
        logger.exception("tool %s crashed", tool.name)
        return StoredResult(f"Error: {tool.name} failed with an internal error.", False)
    return StoredResult(result_text(value), True)
