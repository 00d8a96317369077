"""Check a server's side of a call against the protocol, frame by frame. Pure: no I/O.

The checker sees what Retell would see: every frame we sent and every frame the
server sent, each with the time it left or arrived. It is fed as the call goes
(``on_sent``, ``on_received``), so a live tool (``callbrain chat``, the bench)
and a finished scenario use the same rules, and it keeps the per-turn timings
that the scenario report and the bench are built from.

One rule needs care: "no frame for a superseded ``response_id`` after the newer
request arrived". Arrival is at the server, which the client cannot see, and a
chunk the server wrote a millisecond before it read the newer request is
legitimately still in flight. But the server reads frames in order and writes
them in order on one socket, so once the client has received anything the
server could only have sent *after* reading the newer request (a frame for the
newer id, or the echo of a ping sent after it), every later frame for an older
id is a real violation. The rule is exact with that evidence and never guesses
from timing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson
from pydantic import BaseModel, ValidationError

from callbrain.errors import describe
from callbrain.retell.frames import (
    MAX_ID,
    AgentInterruptFrame,
    ConfigFrame,
    MetadataFrame,
    PingPongFrame,
    ResponseFrame,
    ToolCallInvocationFrame,
    ToolCallResultFrame,
    UpdateAgentFrame,
)

Frame = dict[str, Any]

PING_DEADLINE_S = 5.0
"""Retell closes the socket when pongs stop for about 5 s (with ``auto_reconnect``)."""

FRAME_MODELS: dict[str, type[BaseModel]] = {
    "config": ConfigFrame,
    "ping_pong": PingPongFrame,
    "response": ResponseFrame,
    "agent_interrupt": AgentInterruptFrame,
    "update_agent": UpdateAgentFrame,
    "tool_call_invocation": ToolCallInvocationFrame,
    "tool_call_result": ToolCallResultFrame,
    "metadata": MetadataFrame,
}
"""Each ``response_type`` and the model its frames must fit (the console's
``static/checker.js`` gets their JSON schemas, so its checker types frames alike)."""
ACTIONS = ("end_call", "transfer_number", "digit_to_press")
_SENTENCE_END = re.compile(r"\w[^.!?]*[.!?](\s|$)")

RULES: dict[str, str] = {
    "binary_frame": "Retell reads text frames only",
    "not_json": "a frame that is not a JSON object",
    "unknown_response_type": "response_type missing or not one Retell knows",
    "invalid_frame": "a field of the wrong type or out of range (Retell drops such frames)",
    "null_field": "a field sent as null instead of left out",
    "config_not_first": "config must be the first frame, if sent at all",
    "unrequested_response": "a response for an id Retell never asked for (the begin message is 0)",
    "duplicate_complete": "more than one content_complete for one response_id",
    "frame_after_complete": "a response frame after that id's content_complete",
    "stale_frame": "a frame for a superseded response_id after the server saw the newer request",
    "ping_missed": f"a ping_pong not echoed within {PING_DEADLINE_S:.0f} s",
    "unexpected_pong": "a ping_pong echo for a timestamp that was never sent",
    "exclusive_actions": "end_call, transfer_number and digit_to_press in one response",
    "unmatched_tool_result": "a tool_call_result with no tool_call_invocation before it",
    "turn_incomplete": "a live request that never got content_complete",
}
"""Every rule the checker enforces, with what it means. The console's checker in
the browser (``callbrain/console/static/checker.js``) enforces the same ones; a
test runs both over the same frames."""


@dataclass(frozen=True)
class Violation:
    rule: str
    """A key of :data:`RULES`."""
    detail: str
    at: float
    """Seconds since the first event of the call."""
    response_id: int | None = None

    def __str__(self) -> str:
        rid = "" if self.response_id is None else f" (response {self.response_id})"
        return f"{self.rule}{rid} at {self.at:.3f}s: {self.detail}"


@dataclass
class TurnRecord:
    """One ``response_required`` / ``reminder_required`` and what came of it.

    Times are ``time.monotonic()`` values as given to the checker.
    """

    response_id: int
    requested_at: float
    reminder: bool = False
    superseded_at: float | None = None
    """When the client sent a newer request."""
    seen_newer_at: float | None = None
    """When the client had proof the server read the newer request."""
    first_frame_at: float | None = None
    first_text_at: float | None = None
    first_sentence_at: float | None = None
    completed_at: float | None = None
    completes: int = 0
    text: str = ""
    actions: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.superseded_at is None

    def ms(self, at: float | None) -> float | None:
        """``at`` in milliseconds after the request, or None."""
        return None if at is None else (at - self.requested_at) * 1000


@dataclass
class _Ping:
    sent_at: float
    reported: bool = False
    """Already counted as missed (it may still be echoed, late)."""


class ProtocolChecker:
    """Feed it every frame of one call; read :attr:`violations` and :attr:`turns`."""

    def __init__(self, *, ping_deadline_s: float = PING_DEADLINE_S) -> None:
        self.ping_deadline_s = ping_deadline_s
        self.violations: list[Violation] = []
        self.turns: dict[int, TurnRecord] = {}
        self.ping_rtts: list[float] = []
        """Seconds from each ping to its echo, in order of echo."""
        self.stale_frames = 0
        self.missed_pings = 0
        self.received = 0
        self._start: float | None = None
        self._pings: dict[int, _Ping] = {}
        """Pings not echoed yet, by timestamp."""
        self._latest_id = -1
        self._tool_calls: set[str] = set()
        self.begin = TurnRecord(0, 0.0)
        """Response 0, the begin message: no request, timed from the first event."""

    # ------------------------------------------------------------------ events

    def on_sent(self, frame: Frame, at: float) -> None:
        """We (Retell's side) sent ``frame`` at ``at``."""
        self._clock(at)
        kind = frame.get("interaction_type")
        # Only frames a server must act on count: an id of true or 2**64 is one it
        # rightly skips, and must not be blamed for.
        if kind == "ping_pong" and _is_id(frame.get("timestamp")):
            self._pings[frame["timestamp"]] = _Ping(at)
        elif kind in ("response_required", "reminder_required"):
            rid = frame.get("response_id")
            if _is_id(rid) and rid > self._latest_id:
                for turn in self._all_turns():
                    if turn.response_id < rid and turn.superseded_at is None:
                        turn.superseded_at = at
                self._latest_id = rid
                self.turns[rid] = TurnRecord(rid, at, reminder=kind == "reminder_required")

    def on_received(self, raw: str | bytes, at: float) -> Frame | None:
        """The server sent ``raw`` and it arrived at ``at``; returns it parsed, if it parses."""
        self._clock(at)
        self.received += 1
        self.check_pings(at)
        if isinstance(raw, bytes):
            self._violate("binary_frame", f"{len(raw)} bytes", at)
            return None
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            frame = None
        if not isinstance(frame, dict):
            self._violate("not_json", _clip(raw), at)
            return None
        kind = frame.get("response_type")
        model = FRAME_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            self._violate("unknown_response_type", f"response_type={kind!r}", at)
            return frame
        self._check_shape(frame, model, at)
        if kind == "config" and self.received > 1:
            self._violate("config_not_first", f"config arrived as frame {self.received}", at)
        elif kind == "ping_pong":
            self._on_pong(frame, at)
        elif kind == "response":
            self._on_response(frame, at)
        elif kind == "agent_interrupt":
            self._check_actions(frame, None, at)
        elif kind == "tool_call_invocation":
            self._tool_calls.add(str(frame.get("tool_call_id")))
        elif kind == "tool_call_result" and str(frame.get("tool_call_id")) not in self._tool_calls:
            self._violate("unmatched_tool_result", f"tool_call_id={frame.get('tool_call_id')}", at)
        return frame

    def check_pings(self, now: float) -> None:
        """Report pings older than the deadline that have no echo yet."""
        for ping in self._pings.values():
            if now - ping.sent_at > self.ping_deadline_s and not ping.reported:
                ping.reported = True
                self.missed_pings += 1
                self._violate("ping_missed", f"no echo after {self.ping_deadline_s:.0f} s", now)

    def finish(self, at: float, *, require_complete: bool = True) -> list[Violation]:
        """The call is over: report missed pings and, unless told not to, open turns."""
        self.check_pings(at)
        if require_complete:
            for turn in self.turns.values():
                if turn.live and turn.completes == 0:
                    self._violate("turn_incomplete", "no content_complete", at, turn.response_id)
        return self.violations

    # ---------------------------------------------------------------- helpers

    def _on_pong(self, frame: Frame, at: float) -> None:
        ping = self._pings.pop(frame.get("timestamp"), None)  # type: ignore[arg-type]
        if ping is None:
            self._violate("unexpected_pong", f"timestamp={frame.get('timestamp')!r}", at)
            return
        self.ping_rtts.append(at - ping.sent_at)
        if at - ping.sent_at > self.ping_deadline_s and not ping.reported:
            self.missed_pings += 1
            self._violate("ping_missed", f"echo after {at - ping.sent_at:.1f} s", at)
        # Proof the server read every frame we sent before this ping.
        for turn in self._all_turns():
            if turn.superseded_at is not None and turn.superseded_at <= ping.sent_at:
                turn.seen_newer_at = turn.seen_newer_at or at

    def _on_response(self, frame: Frame, at: float) -> None:
        rid = frame.get("response_id")
        if type(rid) is not int:  # a bool is no id either
            return  # already reported as invalid_frame
        turn = self.turns.get(rid) or (self.begin if rid == 0 else None)
        if turn is None:
            self._violate("unrequested_response", "no request had this id", at, rid)
            return
        # A frame for this id proves the server read every request up to it.
        for older in self._all_turns():
            if older.response_id < rid and older.superseded_at is not None:
                older.seen_newer_at = older.seen_newer_at or at
        if turn.seen_newer_at is not None:
            self.stale_frames += 1
            self._violate("stale_frame", f"content={_clip(str(frame.get('content')))}", at, rid)
            return
        if turn.completes:
            self._violate("frame_after_complete", "", at, rid)
        content = frame.get("content")
        if turn.first_frame_at is None:
            turn.first_frame_at = at
        if isinstance(content, str) and content:
            turn.text += content
            turn.first_text_at = turn.first_text_at or at
            if turn.first_sentence_at is None and _SENTENCE_END.search(turn.text):
                turn.first_sentence_at = at
        self._check_actions(frame, turn, at)
        if frame.get("content_complete") is True:
            turn.completes += 1
            if turn.completes == 2:
                self._violate("duplicate_complete", "", at, rid)
            if turn.completed_at is None:
                turn.completed_at = at
                if turn.first_sentence_at is None and turn.text.strip():
                    turn.first_sentence_at = at  # a last sentence without its full stop

    def _check_actions(self, frame: Frame, turn: TurnRecord | None, at: float) -> None:
        chosen = {key: frame[key] for key in ACTIONS if _is_action(key, frame.get(key))}
        rid = turn.response_id if turn else None
        if len(chosen) > 1:
            self._violate("exclusive_actions", f"one frame sets {sorted(chosen)}", at, rid)
            return
        if turn is None or not chosen:
            return
        if turn.actions and set(chosen) != set(turn.actions):
            both = sorted({*turn.actions, *chosen})
            self._violate("exclusive_actions", f"one response sets {both}", at, rid)
        turn.actions.update(chosen)

    def _check_shape(self, frame: Frame, model: type[BaseModel], at: float) -> None:
        rid = frame.get("response_id") if type(frame.get("response_id")) is int else None
        nulls = sorted(key for key, value in frame.items() if value is None)
        if nulls:
            self._violate("null_field", ", ".join(nulls), at, rid)
        # Unknown fields are ignored by Retell, so only the known ones are typed here.
        known = {k: v for k, v in frame.items() if k in model.model_fields and v is not None}
        try:
            model.model_validate(known, strict=True)
        except ValidationError as exc:
            self._violate("invalid_frame", describe(exc, model, limit=3), at, rid)

    def _all_turns(self) -> list[TurnRecord]:
        return [self.begin, *self.turns.values()]

    def _clock(self, at: float) -> None:
        if self._start is None:
            self._start = self.begin.requested_at = at

    def _violate(self, rule: str, detail: str, at: float, response_id: int | None = None) -> None:
        start = self._start if self._start is not None else at
        self.violations.append(Violation(rule, detail, at - start, response_id))


def _is_id(value: object) -> TypeGuard[int]:
    """A JSON integer the protocol accepts as an id or timestamp (not a bool)."""
    return type(value) is int and 0 <= value <= MAX_ID


def _is_action(key: str, value: object) -> bool:
    return value is True if key == "end_call" else value is not None


def _clip(text: str | bytes, limit: int = 60) -> str:
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
