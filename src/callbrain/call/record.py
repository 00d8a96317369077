"""What happened on a call, turn by turn, as the call goes: its flight data.

The session and its turns fill a :class:`CallRecord` with one
:class:`TurnRecord` per ``response_id`` (and the begin message), each with
what the caller said, what was spoken and what was cut off, which models and
tools ran, and when each step happened. They hand the records to the
server's :class:`CallObserver` s as the call goes: the call records database,
the Prometheus metrics, the OpenTelemetry traces and the console's live view
are all observers, so the call code records once and knows none of them.

Timings are ``time.perf_counter()`` readings; :meth:`TurnRecord.timings_ms`
gives them as milliseconds from the request's arrival.

Observers are called on the event loop, in the middle of a call: they must
return at once (queue the work) and must not raise; the session logs and
ignores an observer that does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

logger = logging.getLogger("callbrain.call")

TurnKind = Literal["begin", "response", "reminder"]
TurnOutcome = Literal["open", "completed", "superseded", "fallback", "drained", "dropped"]
"""``superseded``: a newer request cut it off; ``drained``: a shutdown did;
``dropped``: the socket went while it was open."""
CallEnd = Literal["open", "hangup", "drop", "drain", "error", "inactive"]
IgnoredFrame = Literal["binary", "unknown_type", "malformed", "oversized", "stale_request"]
"""Why an inbound frame was skipped (the call goes on): a fixed set, so a metric
labelled with it stays small."""
RefusedSocket = Literal["address", "secret", "max_calls", "draining", "path"]
"""Why a call socket was refused before it was accepted (``path``: no call socket
there, answered 404)."""


@dataclass(slots=True)
class ToolRecord:
    """One tool call of a turn."""

    name: str
    arguments: str
    started: float
    outcome: Literal["ok", "error", "replayed"] = "ok"
    """``replayed``: a side-effecting tool's stored result was used instead of a new run."""
    duration_s: float | None = None
    action: str | None = None
    """The call action it asked for, if any: end_call, transfer, press_digit."""
    result: str = ""


@dataclass(slots=True)
class ModelRecord:
    """One model request of a turn: who answered, what it cost."""

    provider: str
    model: str
    requested: float
    first_token: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    duration_s: float | None = None
    """From the request to the end of its stream (None while it is open)."""
    failovers: list[str] = field(default_factory=list)
    """``provider/model: reason`` for each provider that failed before this one answered."""
    outcome: str = "open"
    text: str = ""
    """What the model said (without the holding lines and fillers spoken around it)."""


@dataclass(slots=True)
class TurnRecord:
    """One response: a request from Retell (or the begin message) and its answer."""

    response_id: int
    kind: TurnKind
    arrived: float
    """When the request was read from the socket (perf_counter)."""
    caller_text: str = ""
    """The caller's last utterance when the request came."""
    spoken: str = ""
    """Every word sent for this response, in order."""
    outcome: TurnOutcome = "open"
    first_frame: float | None = None
    completed: float | None = None
    models: list[ModelRecord] = field(default_factory=list)
    tools: list[ToolRecord] = field(default_factory=list)
    action: str | None = None
    error: str | None = None
    """Why the fallback line was spoken, for the log and the record (never the caller)."""
    speculation: Literal["hit", "miss"] | None = None
    """Whether the answer was started before the request (see
    :mod:`callbrain.call.speculation`): ``hit`` it was, ``miss`` a held answer
    did not match and was dropped, None no answer was held."""
    speculation_wasted: int = 0
    """Output chunks (about a token each) of speculative answers dropped since the
    previous request."""
    speculative_requests: int = 0
    """Model requests started before this request arrived (the used one included)."""

    def timings_ms(self) -> dict[str, float | None]:
        """Milliseconds from the request's arrival to each step (None if not reached)."""
        first = self.models[0] if self.models else None
        firsts = [m.first_token for m in self.models if m.first_token is not None]
        points = {
            "llm_request": None if first is None else first.requested,
            "first_token": firsts[0] if firsts else None,
            "first_frame": self.first_frame,
            "complete": self.completed,
        }
        return {
            name: None if at is None else round((at - self.arrived) * 1000, 1)
            for name, at in points.items()
        }


@dataclass(slots=True)
class CallRecord:
    """One call on one socket (a reconnect is a new record of the same call id)."""

    call_id: str
    agent: str
    started_at: float = field(default_factory=time.time)
    """Wall-clock start (Unix seconds)."""
    started_perf: float = field(default_factory=time.perf_counter)
    """The same moment as a perf_counter reading, to place the turns' timings in the call."""
    ended_at: float | None = None
    end: CallEnd = "open"
    socket_number: int = 1
    """1 for the first socket of the call, 2 after the first reconnect, and so on."""
    variables: dict[str, str] = field(default_factory=dict)
    turns: list[TurnRecord] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    """Free-form labels, e.g. ``{"playground": True}``."""


class CallObserver(Protocol):
    """Told about a call as it goes; see the module docstring for the rules."""

    def call_started(self, call: CallRecord) -> None: ...

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None: ...

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None: ...

    def call_ended(self, call: CallRecord) -> None: ...


class TrafficObserver(Protocol):
    """Optional methods a :class:`CallObserver` may also have, for what never
    became a turn (the metrics count them); an observer without them is not
    told."""

    def frame_ignored(self, call: CallRecord, reason: IgnoredFrame) -> None: ...

    def socket_refused(self, reason: RefusedSocket) -> None: ...


class Observers:
    """Several observers as one; one that raises is logged and does not stop the others."""

    def __init__(self, observers: list[CallObserver] | None = None) -> None:
        self.observers = list(observers or [])
        # The optional methods, looked up once: a plain CallObserver has none.
        self._frame_ignored = _methods(self.observers, "frame_ignored")
        self._socket_refused = _methods(self.observers, "socket_refused")

    def call_started(self, call: CallRecord) -> None:
        for observer in self.observers:
            self._safely(observer.call_started, call)

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        for observer in self.observers:
            self._safely(observer.turn_started, call, turn)

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        for observer in self.observers:
            self._safely(observer.turn_ended, call, turn)

    def call_ended(self, call: CallRecord) -> None:
        for observer in self.observers:
            self._safely(observer.call_ended, call)

    def frame_ignored(self, call: CallRecord, reason: IgnoredFrame) -> None:
        for method in self._frame_ignored:
            self._safely(method, call, reason)

    def socket_refused(self, reason: RefusedSocket) -> None:
        for method in self._socket_refused:
            self._safely(method, reason)

    @staticmethod
    def _safely(method: Any, *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            logger.exception("call observer %r failed; the call goes on", method)


def _methods(observers: list[CallObserver], name: str) -> list[Any]:
    return [method for o in observers if callable(method := getattr(o, name, None))]


class CallLog:
    """One call's record as it is written: opens and closes its turns, and tells
    the observers, once each, as it goes."""

    def __init__(self, record: CallRecord, observers: Observers) -> None:
        self.record = record
        self.observers = observers
        self._open: dict[int, TurnRecord] = {}

    def open_turn(self, response_id: int, kind: TurnKind) -> TurnRecord:
        turn = TurnRecord(response_id, kind, arrived=time.perf_counter())
        self._open[response_id] = turn
        self.record.turns.append(turn)
        self.observers.turn_started(self.record, turn)
        return turn

    def turn(self, response_id: int) -> TurnRecord | None:
        """The open turn of ``response_id``, if it is still open."""
        return self._open.get(response_id)

    def close_turn(self, response_id: int, outcome: TurnOutcome) -> None:
        """The turn is over: ``outcome`` unless the turn already set its own."""
        turn = self._open.pop(response_id, None)
        if turn is None:
            return
        if turn.outcome == "open":
            turn.outcome = outcome
        self.observers.turn_ended(self.record, turn)

    def end(self, how: CallEnd) -> None:
        """The call is over: ``how`` unless it was already known; open turns end
        as drained or dropped."""
        if self.record.end == "open":
            self.record.end = how
        for response_id in list(self._open):
            self.close_turn(response_id, "drained" if self.record.end == "drain" else "dropped")
        self.record.ended_at = time.time()
        self.observers.call_ended(self.record)
