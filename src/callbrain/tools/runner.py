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
from typing import Any, Literal

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
NOT_RUN = (
    "Error: {tool} was not run: the system that makes sure it runs only once did not answer. "
    "Nothing was done; ask the caller to try again in a moment."
)
LOCK_MARGIN_S = 30.0
"""How long a run lock outlives the tool's timeout: time to store the result."""
STORE_RETRY_S = 30.0
"""How long a result that could not be stored is retried in the background."""

RunKind = Literal["ran", "stored", "refused"]


@dataclass(slots=True)
class Toolbox:
    """What the calls of one server share: the tools, the result store, and the
    side-effecting runs in progress.

    Runs in progress are shared, not per socket, because Retell reconnects a
    dropped call on a new socket: a booking still running for the old socket
    must answer the same request made on the new one, not run a second time.
    """

    tools: Mapping[str, Tool]
    store: ResultStore = field(
        default_factory=lambda: ResultStore(GuardedStore(MemoryStore(), ttl_s=6 * 3600))
    )
    inflight: dict[str, asyncio.Task[tuple[StoredResult, RunKind]]] = field(default_factory=dict)
    keeping: set[asyncio.Task[None]] = field(default_factory=set)
    """Results being stored in the background (retried while the store fails)."""

    def keep(self, key: str, result: StoredResult, tool: str) -> None:
        """Store ``result`` and then let go of its run lock, in the background: the
        caller hears the result at once, however slow the store."""
        task = asyncio.get_running_loop().create_task(self._keep(key, result, tool))
        self.keeping.add(task)
        task.add_done_callback(self.keeping.discard)

    async def _keep(self, key: str, result: StoredResult, tool: str) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STORE_RETRY_S
        delay = 0.1
        while not await self.store.put(key, result):
            if loop.time() >= give_up:
                logger.warning(
                    "%s: its result could not be stored (kept in this call's history only)",
                    tool,
                )
                return  # the lock is left to expire: no other instance runs it meanwhile
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        await self.store.release(key)

    async def aclose(self) -> None:
        """Wait for side-effecting runs still in flight and their results to be
        stored, then release the tools."""
        if self.inflight:
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)
        if self.keeping:
            await asyncio.gather(*self.keeping, return_exceptions=True)
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
        self._toolbox = toolbox
        self._store = toolbox.store
        self._inflight = toolbox.inflight
        self._control = control
        self._send = send
        self._record = record
        self._mine: set[asyncio.Task[tuple[StoredResult, RunKind]]] = set()
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
        result, how = await asyncio.shield(task)
        if owner and how == "ran":
            # The run recorded and reported itself.
            return _run_of(call, result, duration_s=time.perf_counter() - started)
        return await self._finish(call, result, anchor, started, replayed=how != "refused")

    async def _run_side_effect(
        self,
        tool: Tool,
        call: ToolCall,
        arguments: dict[str, Any],
        context: ToolContext,
        anchor: int,
        key: str,
    ) -> tuple[StoredResult, RunKind]:
        """The one real run's result (``ran``), an earlier run's (``stored``), or
        an error when this instance may not run it (``refused``). A real run
        records and reports itself, as the turn that asked may be gone by now."""
        try:
            outcome = await self._claim(tool, key)
            if outcome is not None:
                if outcome[1] == "stored":
                    self._done[key] = outcome[0]
                return outcome
            started = time.perf_counter()
            result = await _execute(tool, arguments, context)
            if result.successful:
                self._done[key] = result
                self._toolbox.keep(key, result, tool.name)
            else:
                # Failures are not kept (the caller may ask to try again): let go now.
                await self._store.release(key)
            await self._finish(call, result, anchor, started)
            return result, "ran"
        finally:
            self._inflight.pop(key, None)

    async def _claim(self, tool: Tool, key: str) -> tuple[StoredResult, RunKind] | None:
        """None once this instance holds the run lock for ``key``; otherwise the
        stored result of a run elsewhere, or why it cannot run here.

        A store that is down is retried until the tool's own timeout: running
        without knowing whether another instance is running it could book twice,
        and Redis paused for a few seconds should cost a wait, not a booking.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + tool.timeout_s
        backoff = 0.05
        while True:
            stored = await self._store.get(key)
            if stored is not None:
                return stored, "stored"
            claim = await self._store.claim(key, hold_s=tool.timeout_s + LOCK_MARGIN_S)
            if claim == "mine":
                return None
            if loop.time() >= deadline:
                break
            if claim == "taken":
                logger.info("%s: the same run is in progress elsewhere; waiting for it", tool.name)
                waited = await self._store.wait(key, until=deadline)
                if waited is not None:
                    return waited, "stored"
                continue  # the lock went without a result: that run failed; try ours
            await asyncio.sleep(backoff)  # the store is unavailable: try again shortly
            backoff = min(backoff * 2, 1.0)
        logger.warning("%s: not run: the shared store could not confirm it runs once", tool.name)
        return StoredResult(NOT_RUN.format(tool=tool.name), False), "refused"

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
