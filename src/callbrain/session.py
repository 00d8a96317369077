"""One call's state machine: one :class:`CallSession` per Retell socket.

The rules it keeps, on every path including errors, timeouts and cancellation:

* ``ping_pong`` is answered from the read loop itself, so it never waits behind
  a generation.
* Each ``response_required`` / ``reminder_required`` runs in its own task. A
  newer request cancels the older task at once, which closes its provider
  stream (see :mod:`callbrain.llm.base`).
* Every frame for a response goes through :meth:`CallSession._send_response`,
  the one place that checks, under the send lock, that the id is still the
  newest one and not yet completed. So no frame for a superseded id can be sent
  after the newer request arrived, and no id is completed twice.
* A live response always ends with exactly one ``content_complete: true``; if
  the model fails, the caller hears the agent's fallback line, never the error.
  What a response does (speak, call tools, speak again) is :mod:`callbrain.turn`.
* A malformed frame is logged and skipped; the call goes on.

The session also owns what outlives a turn: the call's tool history (so the
model knows what already ran, even in a turn cut short), the tool runner with
its idempotency store, and the :class:`~callbrain.call_control.CallControl`
handle that tools and application code use to reach the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from callbrain.access import fit_transcript
from callbrain.agent import Agent
from callbrain.call_control import CallControl, CallHook
from callbrain.call_store import CallMemory, CallStore, MemoryCallStore
from callbrain.conversation import ToolExchange, build_chat_request, render_template
from callbrain.llm.base import LLM
from callbrain.llm.chat import ChatRequest
from callbrain.protocol import (
    CallDetails,
    ConfigFlags,
    ConfigFrame,
    FrameError,
    OutboundFrame,
    PingPong,
    PingPongFrame,
    ReminderRequired,
    ResponseFrame,
    ResponseRequired,
    TurnRequest,
    UnknownInteraction,
    UpdateOnly,
    Utterance,
    encode,
    parse_inbound,
)
from callbrain.settings import AccessSettings
from callbrain.tools.runner import Toolbox, ToolRun, ToolRunner
from callbrain.turn import Turn

logger = logging.getLogger("callbrain.session")

_STORE_TIMEOUT_S = 2.0
"""A store that does not answer in this long is skipped: the call must go on."""

# WebSocket close code for "server error" (RFC 6455). Never 1000: Retell takes 1000 as a
# deliberate hang-up and ends the call without reconnecting.
CLOSE_INTERNAL_ERROR = 1011

# Fields of the call object that prompts may use as {{variables}} too.
_CALL_FIELDS = ("call_id", "call_type", "direction", "from_number", "to_number", "agent_id")


class Transport(Protocol):
    """The socket as the session sees it; the server adapts Starlette's WebSocket to it."""

    async def receive(self) -> str | bytes | None:
        """The next frame (text or binary), or None once the peer has gone."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int) -> None: ...


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
        call_store: CallStore | None = None,
    ) -> None:
        """``toolbox`` is shared by the server's calls (by default this call gets
        the agent's tools, built now, and a private in-memory store);
        ``on_call_start`` runs as a task once the call is up; ``limits`` (frame
        and transcript size) default to the agent's ``server.access``;
        ``call_store`` keeps what the call knows for a reconnect (shared by the
        server's calls; by default a private one, which no reconnect can reach)."""
        self.agent = agent
        self.llm = llm
        self.call_id = call_id
        self._transport = transport
        self.transcript: list[Utterance] = []
        self.turntaking: str | None = None
        self.call: dict[str, object] | None = None
        self.variables: dict[str, str] = {**agent.dynamic_variables, "call_id": call_id}
        self.tool_history: list[ToolExchange] = []
        self.control = CallControl(call_id, self, self.variables, lambda: self.call)
        self.control.on_change = self._remember
        self.runner = ToolRunner(
            toolbox=toolbox if toolbox is not None else Toolbox(agent.build_tools()),
            control=self.control,
            send=self.send_frame,
            record=self._record_tool_run,
        )
        self._on_call_start = on_call_start
        self._limits = limits if limits is not None else agent.server.access
        self._store = call_store if call_store is not None else MemoryCallStore()
        self._saves: set[asyncio.Task[None]] = set()
        self._save_lock = asyncio.Lock()
        self.resumed = False
        """The call's memory was found: this socket is a reconnect."""
        self._transcript_cut = False  # the first cut is a warning, later ones debug
        # The begin message is response 0; every request from Retell has a higher id.
        self._latest_id = 0
        self._completed_id = -1
        self._turn: asyncio.Task[None] | None = None
        self._begin: asyncio.Task[None] | None = None
        self._hook: asyncio.Task[None] | None = None
        self._details_arrived = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._open = True
        self._holding_lines = 0
        self._shutting_down = False

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Serve the call until Retell closes the socket."""
        logger.info(
            "call started (agent=%s, llm=%s/%s)", self.agent.name, self.llm.provider, self.llm.model
        )
        try:
            await self._restore()
            flags = self.agent.retell_config
            await self._send(ConfigFrame(config=ConfigFlags(**flags.model_dump())))
            if self.agent.wait_for_call_details:
                self._begin = asyncio.create_task(self._greet_after_details())
            else:
                await self._greet()
            if self._on_call_start is not None:
                self._hook = asyncio.create_task(self._run_hook(self._on_call_start))
            while (raw := await self._transport.receive()) is not None:
                await self._dispatch(raw)
        except Exception:
            logger.exception("session failed; closing the socket with %d", CLOSE_INTERNAL_ERROR)
            self._open = False
            with contextlib.suppress(Exception):
                await self._transport.close(CLOSE_INTERNAL_ERROR)
        finally:
            self._open = False
            await self._stop_tasks()
            self._remember()  # what tools finished while stopping
            await self._flush_saves()
            logger.info("call ended")

    async def _dispatch(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            logger.warning("ignored a binary frame (%d bytes); Retell sends only text", len(raw))
            return
        size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
        if size > self._limits.max_frame_bytes:
            logger.warning(
                "ignored a %d-byte frame: over max_frame_bytes (%d); the call goes on",
                size,
                self._limits.max_frame_bytes,
            )
            return
        try:
            frame = parse_inbound(raw)
        except UnknownInteraction as exc:
            logger.info("ignored frame: %s", exc)
            return
        except FrameError as exc:
            logger.warning("ignored malformed frame (%d chars): %s", len(raw), exc)
            return
        if isinstance(frame, UpdateOnly | ResponseRequired | ReminderRequired):
            frame, cut = fit_transcript(frame, self._limits.max_transcript_chars)
            if cut is not None:
                logger.log(logging.DEBUG if self._transcript_cut else logging.WARNING, "%s", cut)
                self._transcript_cut = True
        if isinstance(frame, PingPong):
            await self._send(PingPongFrame(timestamp=frame.timestamp))
        elif isinstance(frame, UpdateOnly):
            self.transcript = frame.transcript
            if frame.turntaking is not None:
                self.turntaking = frame.turntaking
        elif isinstance(frame, CallDetails):
            self._on_call_details(frame)
        else:
            self._on_turn_request(frame)

    def _on_call_details(self, frame: CallDetails) -> None:
        self.call = frame.call
        for key in _CALL_FIELDS:
            value = frame.call.get(key)
            if isinstance(value, str):
                self.variables[key] = value
        self.variables.update(frame.dynamic_variables)
        self._details_arrived.set()
        self._remember()
        logger.info("call details received (%d dynamic variables)", len(frame.dynamic_variables))

    def _on_turn_request(self, frame: TurnRequest) -> None:
        rid = frame.response_id
        if rid <= self._latest_id:
            logger.warning(
                "ignored %s %d: not newer than response %d",
                frame.interaction_type,
                rid,
                self._latest_id,
            )
            return
        # From here on the older id is superseded: _send_response refuses it.
        previous, self._latest_id = self._latest_id, rid
        self.transcript = frame.transcript
        if self._shutting_down:
            # Its turn could not finish before the socket goes: complete it empty,
            # and Retell asks again on the socket it reconnects.
            logger.info("response %d completed empty: the server is shutting down", rid)
            if self._turn is not None:
                self._turn.cancel()
            self._turn = asyncio.create_task(self._complete_empty(rid))
            return
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            logger.info("response %d superseded by %d", previous, rid)
        self._turn = asyncio.create_task(self._respond(frame), name=f"response-{rid}")

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
        if self.resumed:
            # A reconnect mid-call: the caller heard the greeting long ago.
            await self._send_response(0, "", complete=True)
            return
        text, missing = render_template(self.agent.begin_message, self.variables)
        if missing:
            logger.warning("begin_message variables without a value: %s", ", ".join(missing))
        await self._send_response(0, text.strip(), complete=True)

    async def _respond(self, frame: TurnRequest) -> None:
        rid = frame.response_id
        reminder = isinstance(frame, ReminderRequired)
        started = time.perf_counter()
        try:
            request = self._chat_request(frame, reminder)
        except Exception:
            logger.exception("response %d: could not build the model request", rid)
            await self._send_response(rid, self.agent.fallback_message, complete=True)
            return
        turn = Turn(
            response_id=rid,
            request=request,
            anchor=len(frame.transcript),
            agent=self.agent,
            llm=self.llm,
            runner=self.runner,
            send=self._send_response,
            holding_line=self._next_holding_line,
        )
        await turn.run()
        report = turn.report
        if rid == self._completed_id:
            logger.info(
                "response %d%s complete: first text %s ms, done %.0f ms%s%s%s",
                rid,
                " (reminder)" if reminder else "",
                "-" if report.first_text is None else f"{(report.first_text - started) * 1000:.0f}",
                (time.perf_counter() - started) * 1000,
                f", {report.tool_calls} tool call(s)" if report.tool_calls else "",
                f", then {report.action}" if report.action else "",
                ", with fallback" if report.failed else "",
            )

    async def _complete_empty(self, response_id: int) -> None:
        await self._send_response(response_id, "", complete=True)

    async def finish_turns(self, grace: float) -> None:
        """For a shutdown: let the open turn end by itself for up to ``grace``
        seconds, then end it: cancelled between two chunks (never inside one) and
        completed with an empty ``content_complete`` frame. The socket stays open;
        closing it is the server's business."""
        deadline = asyncio.get_running_loop().time() + grace
        self._shutting_down = True
        # A newer request may replace the turn meanwhile: follow whichever is open.
        while (turn := self._turn) is not None and not turn.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                turn.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await turn
                break
            await asyncio.wait({turn}, timeout=left)
        if self._latest_id > self._completed_id and self._latest_id > 0:
            logger.info("response %d ended for the shutdown", self._latest_id)
            await self._complete_empty(self._latest_id)

    def _chat_request(self, frame: TurnRequest, reminder: bool) -> ChatRequest:
        woven = frame.transcript_with_tool_calls
        request, missing = build_chat_request(
            system_prompt=self.agent.system_prompt,
            transcript=frame.transcript,
            variables=self.variables,
            max_messages=self.agent.max_history_messages,
            reminder_prompt=self.agent.reminder_prompt if reminder else None,
            tools=[tool.spec for tool in self.runner.tools.values()],
            history=self.tool_history,
            # Retell's woven transcript, when asked for, is the record of tool calls.
            woven=woven if self.agent.retell_config.transcript_with_tool_calls else None,
        )
        if missing:
            logger.warning("system_prompt variables without a value: %s", ", ".join(missing))
        return request

    def _next_holding_line(self) -> str:
        """The agent's holding lines in turn, so a caller does not hear the same one twice."""
        lines = self.agent.holding_messages
        if not lines:
            return ""
        self._holding_lines += 1
        return lines[(self._holding_lines - 1) % len(lines)]

    def _record_tool_run(self, run: ToolRun, anchor: int) -> None:
        self.tool_history.append(ToolExchange(anchor, run.call, run.output))
        self._remember()

    # ----------------------------------------------------------------- memory

    async def _restore(self) -> None:
        """Pick up where a dropped socket of this call left off, if it did."""
        try:
            async with asyncio.timeout(_STORE_TIMEOUT_S):
                memory = await self._store.load(self.call_id)
        except Exception as exc:
            logger.warning("could not load the call's memory (%r); starting afresh", exc)
            return
        if memory is None:
            return
        self.resumed = True
        if memory.call is not None:
            self._on_call_details(CallDetails(interaction_type="call_details", call=memory.call))
        self.tool_history = list(memory.tool_history)
        self.control.interrupt_id = memory.interrupt_id
        self.control.overrides = dict(memory.agent_overrides)
        logger.info(
            "call resumed on a new socket: %d tool result(s) restored", len(self.tool_history)
        )

    def _remember(self) -> None:
        """Save what the call knows now, in the background and in order."""
        memory = CallMemory(
            call=self.call,
            tool_history=list(self.tool_history),
            interrupt_id=self.control.interrupt_id,
            agent_overrides=dict(self.control.overrides),
        )
        task = asyncio.get_running_loop().create_task(self._save(memory))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    async def _save(self, memory: CallMemory) -> None:
        async with self._save_lock:  # FIFO: a later state is never overwritten by an earlier
            try:
                async with asyncio.timeout(_STORE_TIMEOUT_S):
                    await self._store.save(self.call_id, memory)
            except Exception as exc:
                logger.warning("could not save the call's memory (%r); the call goes on", exc)

    async def _flush_saves(self) -> None:
        if self._saves:
            await asyncio.wait(set(self._saves), timeout=_STORE_TIMEOUT_S * 2)

    async def _run_hook(self, hook: CallHook) -> None:
        try:
            await hook(self.control)
        except Exception:
            logger.exception("on_call_start hook failed; the call goes on")

    async def _send_response(
        self,
        response_id: int,
        content: str,
        *,
        complete: bool,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """Send content for ``response_id`` if it is still the live one; True if sent.

        ``fields`` are the frame's optional flags (actions, no_interruption_allowed).
        """
        async with self._send_lock:
            if response_id != self._latest_id or response_id <= self._completed_id:
                return False
            if not self._open:
                return False
            frame = ResponseFrame(
                response_id=response_id,
                content=content,
                content_complete=complete,
                **(fields or {}),
            )
            if not await self._write(frame):
                return False
            if complete:
                self._completed_id = response_id
            return True

    async def _send(self, frame: OutboundFrame) -> None:
        await self.send_frame(frame)

    async def send_frame(self, frame: OutboundFrame) -> bool:
        """Send a frame that belongs to no response (pong, tool bookkeeping,
        agent_interrupt, update_agent, metadata); True if it went out."""
        async with self._send_lock:
            return self._open and await self._write(frame)

    async def _write(self, frame: OutboundFrame) -> bool:
        # Called with the send lock held. A frame that cannot be encoded is our bug,
        # not a dead socket: log it and keep the call.
        try:
            text = encode(frame)
        except Exception:
            logger.exception("could not encode a %s frame; not sent", frame.response_type)
            return False
        # A socket that died under us ends the call quietly: the read loop sees
        # the close next and tears the session down.
        try:
            await self._transport.send_text(text)
        except Exception as exc:
            self._open = False
            logger.info("socket closed while sending %s: %r", frame.response_type, exc)
            return False
        return True

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self._turn, self._begin, self._hook) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Side-effecting tools are never cut short; their results are stored for a reconnect.
        await self.runner.aclose()
