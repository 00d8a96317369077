"""One call: the glue between the socket, the response ledger and the turns.

A :class:`CallSession` serves one Retell socket from the ``config`` frame to
the close. The rules live elsewhere, each in one place: which ``response_id``
may speak and which owes a ``content_complete`` (:mod:`~callbrain.retell.ledger`),
what a frame must pass to be acted on (:mod:`~callbrain.call.inbound`), what a
response does and when the fallback line is spoken (:mod:`~callbrain.call.turn`,
built by :mod:`~callbrain.call.responder`), how every frame is written
(:mod:`~callbrain.call.sender`), the socket's life (:mod:`~callbrain.call.state`)
and what survives a reconnect (:mod:`~callbrain.call.memory`).

What the session does itself: it answers ``ping_pong`` from the read loop, so
a pong never waits behind a generation; it runs each request as its own task,
and a newer request cancels the older one at once, which closes its provider
stream; it greets, restores and remembers the call, and finishes its turns
for a shutdown.

Cancelling :meth:`CallSession.run` is safe at any point: the turn tasks are
cancelled, side-effecting tools finish in the background, and the call's
memory is flushed to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from callbrain.agent import Agent
from callbrain.call.control import CallControl, CallHook
from callbrain.call.conversation import (
    ToolExchange,
    last_caller_text,
    render_template,
)
from callbrain.call.inbound import InboundFrames
from callbrain.call.memory import CallMemory, MemoryKeeper
from callbrain.call.record import CallLog, CallRecord, Observers, TurnOutcome, TurnRecord
from callbrain.call.responder import Responder
from callbrain.call.sender import Sender, Transport
from callbrain.call.state import CallState, Lifecycle
from callbrain.call.variables import call_variables, turn_variables
from callbrain.llm.base import LLM
from callbrain.retell.frames import (
    CallDetails,
    ConfigFlags,
    ConfigFrame,
    OutboundFrame,
    PingPong,
    PingPongFrame,
    ReminderRequired,
    TurnRequest,
    UpdateOnly,
    Utterance,
)
from callbrain.retell.ledger import BEGIN_ID, ResponseLedger
from callbrain.server.settings import AccessSettings
from callbrain.stores.guard import GuardedStore
from callbrain.stores.memory import MemoryStore
from callbrain.tools.idempotency import ResultStore
from callbrain.tools.runner import Toolbox, ToolRun, ToolRunner

logger = logging.getLogger("callbrain.call")

# WebSocket close codes (RFC 6455). Never 1000 for a failure: Retell takes 1000 as
# a deliberate hang-up and ends the call without reconnecting.
CLOSE_NORMAL = 1000
CLOSE_INTERNAL_ERROR = 1011


class CallSession:
    """Drives one call from the first ``config`` frame to the closed socket."""

    def __init__(
        self,
        agent: Agent,
        llm: LLM,
        transport: Transport,
        call_id: str,
        *,
        toolbox: Toolbox | None = None,
        on_call_start: CallHook | None = None,
        limits: AccessSettings | None = None,
        store: GuardedStore | None = None,
        observers: Observers | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        """``toolbox`` and ``store`` are shared by the server's calls (by default
        this call gets the agent's tools, built now, with their results in
        ``store``, and ``store`` is a private in-memory one, which no reconnect
        can reach); ``on_call_start`` runs as a task
        once the call is up; ``limits`` (frame and transcript size, inactivity)
        default to the agent's ``server.access``; ``observers`` are told about
        the call and each turn as they go (records, metrics, traces)."""
        self.agent = agent
        self.llm = llm
        self.call_id = call_id
        self._transport = transport
        self.lifecycle = Lifecycle()
        self.ledger = ResponseLedger()
        self.transcript: list[Utterance] = []
        self.turntaking: str | None = None
        self.call: dict[str, object] | None = None
        self.variables = call_variables(agent.dynamic_variables, call_id, None)
        self.tool_history: list[ToolExchange] = []
        self.control = CallControl(call_id, self, self.variables, lambda: self.call)
        self.control.on_change = self._remember
        store = store or GuardedStore(MemoryStore(), ttl_s=agent.server.store.ttl_s)
        if toolbox is None:
            toolbox = Toolbox(agent.build_tools(), ResultStore(store))
        self.runner = ToolRunner(
            toolbox=toolbox,
            control=self.control,
            send=self.send_frame,
            record=self._record_tool_run,
        )
        self.record = CallRecord(call_id, agent.name, variables=self.variables, tags=tags or {})
        self._observers = observers or Observers()
        self._log = CallLog(self.record, self._observers)
        self._sender = Sender(transport, self.ledger, self.lifecycle)
        self._on_call_start = on_call_start
        self._limits = limits if limits is not None else agent.server.access
        self._inbound = InboundFrames(self._limits, self._observers, self.record)
        self._memory = MemoryKeeper(store, call_id, on_restored=self._resume_late)
        self._sockets = 1
        self._turn: asyncio.Task[None] | None = None
        self._begin: asyncio.Task[None] | None = None
        self._hook: asyncio.Task[None] | None = None
        self._details_arrived = asyncio.Event()
        self._responder = Responder(
            agent=agent,
            llm=llm,
            runner=self.runner,
            send=self._send_response,
            variables=self._turn_variables,
            history=lambda: self.tool_history,
        )

    @property
    def resumed(self) -> bool:
        """Whether this socket is a reconnect of a call seen before."""
        return self._sockets > 1

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Serve the call until Retell closes the socket."""
        logger.info(
            "call started (agent=%s, llm=%s/%s)", self.agent.name, self.llm.provider, self.llm.model
        )
        try:
            await self._restore()
            self.record.socket_number = self._sockets
            self._observers.call_started(self.record)
            flags = self.agent.retell_config
            await self.send_frame(ConfigFrame(config=ConfigFlags(**flags.model_dump())))
            if self.resumed and self.control.overrides:
                await self.control.resend_overrides()
            self.lifecycle.to(CallState.OPEN)
            if self.agent.wait_for_call_details and not self.resumed:
                self._begin = asyncio.create_task(self._greet_after_details())
            else:
                await self._greet()
            if self._on_call_start is not None:
                self._hook = asyncio.create_task(self._run_hook(self._on_call_start))
            await self._read_loop()
        except Exception:
            logger.exception("session failed; closing the socket with %d", CLOSE_INTERNAL_ERROR)
            self.record.end = "error"
            with contextlib.suppress(Exception):
                await self._transport.close(CLOSE_INTERNAL_ERROR)
        finally:
            await self._end()

    async def _read_loop(self) -> None:
        idle = self._limits.max_idle_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    raw = await self._transport.receive()
            except TimeoutError:
                logger.warning("no frame for %.0f s (max_idle_s); closing the call", idle)
                self.record.end = "inactive"
                self.lifecycle.to(CallState.CLOSED)
                with contextlib.suppress(Exception):
                    await self._transport.close(CLOSE_NORMAL)
                return
            if raw is None:
                if self.record.end == "open":
                    code = self._transport.close_code
                    self.record.end = "hangup" if code in (1000, 1001) else "drop"
                return
            await self._dispatch(raw)

    async def _end(self) -> None:
        self.lifecycle.to(CallState.CLOSED)
        await self._stop_tasks()
        await self._memory.flush()
        self._log.end("drain" if self.lifecycle.draining else "drop")
        logger.info("call ended (%s)", self.record.end)

    async def _dispatch(self, raw: str | bytes) -> None:
        frame = self._inbound.read(raw)
        if frame is None:
            return
        if isinstance(frame, PingPong):
            await self.send_frame(PingPongFrame(timestamp=frame.timestamp))
        elif isinstance(frame, UpdateOnly):
            self.transcript = frame.transcript
            if frame.turntaking is not None:
                self.turntaking = frame.turntaking
            if self.ledger.owed is None:  # nobody is speaking: it may be worth a head start
                self._responder.consider(frame)
        elif isinstance(frame, CallDetails):
            self._take_call_details(frame.call)
            self._remember()
            logger.debug("call details received (%d dynamic variables)", len(self.variables))
        else:
            self._on_turn_request(frame)

    def _take_call_details(self, call: dict[str, Any]) -> None:
        self.call = call
        # In place: the call's control and record hold this dict.
        self.variables.update(call_variables(self.agent.dynamic_variables, self.call_id, call))
        self._details_arrived.set()

    def _turn_variables(self) -> dict[str, str]:
        """The variables with the clock as it is now (see :mod:`callbrain.call.variables`)."""
        return turn_variables(self.variables, self.call, self.agent.zone)

    def _on_turn_request(self, frame: TurnRequest) -> None:
        rid = frame.response_id
        superseded = self.ledger.admit(rid)
        if superseded is None:
            logger.warning(
                "ignored %s %d: not newer than response %d",
                frame.interaction_type,
                rid,
                self.ledger.latest,
            )
            self._observers.frame_ignored(self.record, "stale_request")
            return
        # From here on the older id is superseded: the ledger refuses it.
        self.transcript = frame.transcript
        self._log.close_turn(superseded.previous, "superseded")
        record = self._log.open_turn(
            rid, "reminder" if isinstance(frame, ReminderRequired) else "response"
        )
        record.caller_text = last_caller_text(frame.transcript)
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            if superseded.was_open:
                logger.debug("response %d superseded by %d", superseded.previous, rid)
        if self.lifecycle.draining:
            # Its turn could not finish before the socket goes: complete it empty,
            # and Retell asks again on the socket it reconnects.
            logger.info("response %d completed empty: the server is shutting down", rid)
            self._turn = asyncio.create_task(self._complete_empty(rid, "drained"))
            return
        self._turn = asyncio.create_task(self._respond(frame, record), name=f"response-{rid}")

    # --------------------------------------------------------------------- turns

    async def _greet_after_details(self) -> None:
        try:
            async with asyncio.timeout(self.agent.call_details_timeout_s):
                await self._details_arrived.wait()
        except TimeoutError:
            logger.warning(
                "no call_details after %.1fs; greeting with default variables",
                self.agent.call_details_timeout_s,
            )
        await self._greet()

    async def _greet(self) -> None:
        record = self._log.open_turn(BEGIN_ID, "begin")
        text = ""
        if not self.resumed:  # a reconnect: the caller heard the greeting long ago
            text, missing = render_template(self.agent.begin_message, self._turn_variables())
            if missing:
                logger.warning("begin_message variables without a value: %s", ", ".join(missing))
        if await self._send_response(BEGIN_ID, text.strip(), complete=True):
            record.spoken = text.strip()
            record.first_frame = record.completed = time.perf_counter()
            record.outcome = "completed"
        self._log.close_turn(BEGIN_ID, "superseded")

    async def _respond(self, frame: TurnRequest, record: TurnRecord) -> None:
        rid = frame.response_id
        turn = self._responder.turn(frame, record)
        await turn.run()
        if record.outcome != "open":
            timings = record.timings_ms()
            logger.debug(
                "response %d %s: first frame %s ms, complete %s ms",
                rid,
                record.outcome,
                timings["first_frame"],
                timings["complete"],
            )
        self._log.close_turn(rid, "superseded")

    async def _complete_empty(self, response_id: int, outcome: TurnOutcome) -> None:
        if await self._send_response(response_id, "", complete=True):
            record = self._log.turn(response_id)
            if record is not None:
                record.outcome = outcome
                record.completed = time.perf_counter()
        self._log.close_turn(response_id, outcome)

    async def finish_turns(self, grace: float) -> None:
        """For a shutdown: let the open turn end by itself for up to ``grace``
        seconds, then end it: cancelled between two chunks (never inside one) and
        completed with an empty ``content_complete`` frame. The socket stays open;
        closing it is the server's business."""
        deadline = asyncio.get_running_loop().time() + grace
        if not self.lifecycle.closed:
            self.lifecycle.to(CallState.DRAINING)
        # A newer request may replace the turn meanwhile: follow whichever is open.
        while (turn := self._turn) is not None and not turn.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                turn.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await turn
                break
            await asyncio.wait({turn}, timeout=left)
        owed = self.ledger.owed
        if owed is not None and owed != BEGIN_ID:
            logger.info("response %d ended for the shutdown", owed)
            await self._complete_empty(owed, "drained")

    def _record_tool_run(self, run: ToolRun, anchor: int) -> None:
        self.tool_history.append(ToolExchange(anchor, run.call, run.output))
        self._remember()

    # ----------------------------------------------------------------- memory

    async def _restore(self) -> None:
        """Pick up where a dropped socket of this call left off, if it did; then
        record the call, so that even a call that has done nothing yet is known
        as one (a reconnect must not greet again)."""
        memory = await self._memory.load()
        if memory is not None:
            self._resume(memory)
        self._remember()

    def _resume(self, memory: CallMemory) -> None:
        """Take what earlier sockets of this call knew, keeping what this one has
        learnt meanwhile (the store may answer late, see :class:`MemoryKeeper`)."""
        self._sockets = max(self._sockets, memory.sockets + 1)
        self.record.socket_number = self._sockets
        if memory.call is not None and self.call is None:
            self._take_call_details(memory.call)
        known = {exchange.call.id for exchange in memory.tool_history}
        mine = [exchange for exchange in self.tool_history if exchange.call.id not in known]
        self.tool_history = [*memory.tool_history, *mine]
        self.control.interrupt_id = max(self.control.interrupt_id, memory.interrupt_id)
        self.control.overrides = {**memory.agent_overrides, **self.control.overrides}
        logger.info(
            "call resumed on socket %d: %d tool result(s) restored",
            self._sockets,
            len(memory.tool_history),
        )

    def _resume_late(self, memory: CallMemory) -> None:
        self._resume(memory)
        self._remember()

    def _remember(self) -> None:
        """Save what the call knows now, in the background."""
        self._memory.save(
            CallMemory(
                call=self.call,
                tool_history=list(self.tool_history),
                interrupt_id=self.control.interrupt_id,
                agent_overrides=dict(self.control.overrides),
                sockets=self._sockets,
            )
        )

    async def _run_hook(self, hook: CallHook) -> None:
        try:
            await hook(self.control)
        except Exception:
            logger.exception("on_call_start hook failed; the call goes on")

    # ------------------------------------------------------------------ sending

    async def _send_response(
        self,
        response_id: int,
        content: str,
        *,
        complete: bool,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        return await self._sender.response(response_id, content, complete=complete, fields=fields)

    async def send_frame(self, frame: OutboundFrame) -> bool:
        """Send a frame that belongs to no response (config, pong, tool
        bookkeeping, agent_interrupt, update_agent, metadata); True if it went out."""
        return await self._sender.frame(frame)

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._turn, self._begin, self._hook) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._responder.aclose()
        # Side-effecting tools are never cut short; their results are stored for a reconnect.
        await self.runner.aclose()
