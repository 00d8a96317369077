"""From Retell's request to the :class:`~callbrain.call.turn.Turn` that answers it.

The session knows the socket and the response ids; this knows what a turn is
made of: the model request for the transcript (the agent's prompt, the call's
variables and tool history, Retell's woven transcript when the agent asks for
it, a reminder's instruction), the holding lines in turn, and whether an answer
started before the request (:mod:`callbrain.call.speculation`) can be used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from callbrain.agent import Agent
from callbrain.call.conversation import ToolExchange, build_chat_request
from callbrain.call.record import TurnRecord
from callbrain.call.speculation import Speculator, Taken
from callbrain.call.turn import ResponseSender, Turn
from callbrain.llm.base import LLM, CompletionStream
from callbrain.llm.chat import ChatRequest
from callbrain.retell.frames import ReminderRequired, TurnRequest, UpdateOnly
from callbrain.tools.runner import ToolRunner

logger = logging.getLogger("callbrain.call")


class Responder:
    """Builds one call's model requests and turns."""

    def __init__(
        self,
        *,
        agent: Agent,
        llm: LLM,
        runner: ToolRunner,
        send: ResponseSender,
        variables: Callable[[], Mapping[str, str]],
        history: Callable[[], Sequence[ToolExchange]],
    ) -> None:
        """``variables`` and ``history`` give the call's template variables (the
        clock included) and tool history as they are at each request."""
        self.agent = agent
        self.llm = llm
        self.runner = runner
        self._send = send
        self._variables = variables
        self._history = history
        self._holding_lines = 0
        spec = agent.speculation
        enabled = spec.enabled if spec.enabled is not None else agent.llm.provider != "local"
        self.speculator = Speculator(llm, spec) if enabled else None

    def request(self, frame: TurnRequest | UpdateOnly) -> ChatRequest:
        """The model request answering ``frame``'s transcript."""
        reminder = isinstance(frame, ReminderRequired)
        woven = frame.transcript_with_tool_calls
        request, missing = build_chat_request(
            system_prompt=self.agent.system_prompt,
            transcript=frame.transcript,
            variables=self._variables(),
            max_messages=self.agent.max_history_messages,
            reminder_prompt=self.agent.reminder_prompt if reminder else None,
            tools=[tool.spec for tool in self.runner.tools.values()],
            history=self._history(),
            # Retell's woven transcript, when asked for, is the record of tool calls.
            woven=woven if self.agent.retell_config.transcript_with_tool_calls else None,
        )
        if missing:
            logger.warning("system_prompt variables without a value: %s", ", ".join(missing))
        return request

    def turn(self, frame: TurnRequest, record: TurnRecord) -> Turn:
        """The turn for ``frame`` (its request is built inside it, so a request
        that cannot be built ends in the fallback line like any other failure)."""
        if isinstance(frame, ReminderRequired) and self.speculator is not None:
            _spent(record, self.speculator.drop())  # never for a reminder
        held = None if isinstance(frame, ReminderRequired) else self._held(record)
        return Turn(
            record=record,
            build_request=lambda: self.request(frame),
            anchor=len(frame.transcript),
            agent=self.agent,
            llm=self.llm,
            runner=self.runner,
            send=self._send,
            holding_line=self._next_holding_line,
            open_first=held,
        )

    def consider(self, frame: UpdateOnly) -> None:
        """The live transcript changed while no response is open: speculate on it."""
        if self.speculator is None:
            return
        try:
            request = self.request(frame)
        except Exception:
            logger.debug("no speculation: the request could not be built", exc_info=True)
            return
        self.speculator.consider(request)

    def _held(self, record: TurnRecord) -> Callable[[ChatRequest], CompletionStream] | None:
        """Opens the turn's first completion: the held one if it answers the request."""
        speculator = self.speculator
        if speculator is None:
            return None

        def open_first(request: ChatRequest) -> CompletionStream:
            taken = speculator.take(request)
            _spent(record, taken)
            held = taken.stream
            record.speculation = "hit" if held is not None else "miss" if taken.missed else None
            return held if held is not None else self.llm.chat(request)

        return open_first

    def _next_holding_line(self) -> str:
        """The agent's holding lines in turn, so a caller does not hear the same one twice."""
        lines = self.agent.holding_messages
        if not lines:
            return ""
        self._holding_lines += 1
        return lines[(self._holding_lines - 1) % len(lines)]

    async def aclose(self) -> None:
        if self.speculator is not None:
            await self.speculator.aclose()


def _spent(record: TurnRecord, taken: Taken) -> None:
    record.speculation_wasted = taken.wasted
    record.speculative_requests = taken.requests
