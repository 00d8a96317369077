"""A call's flight data (:mod:`callbrain.call.record`) as rows of the tables in
:mod:`callbrain.records.schema`, redacted as the settings say.

Rows are made when a batch is written, not when the observer is told: the
observer only queues references, so a call pays nothing for its record, and a
superseded turn's last figures (its model's token usage, set as its task
unwinds) are in by then.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from callbrain.call.record import CallRecord, ModelRecord, ToolRecord, TurnRecord
from callbrain.records.redact import Redactor
from callbrain.records.settings import Redaction

MAX_TEXT_CHARS = 20_000
"""Longer texts (a tool's result, say) are cut to this, with a mark."""

Row = dict[str, Any]


@dataclass
class CallKey:
    """What the recorder keeps per socket while it is open: its row id and its
    redactor (which learns the call's names as it goes)."""

    id: str
    redactor: Redactor

    @classmethod
    def new(cls, mode: Redaction) -> CallKey:
        return cls(uuid.uuid4().hex, Redactor(mode))


@dataclass
class Batch:
    """Rows to write in one transaction: calls first, then what hangs off them."""

    calls: dict[str, Row] = field(default_factory=dict)
    turns: list[Row] = field(default_factory=list)
    models: list[Row] = field(default_factory=list)
    tools: list[Row] = field(default_factory=list)

    def add_call(self, key: CallKey, call: CallRecord) -> None:
        """The call's row as it is now (a later state replaces an earlier one)."""
        self.calls[key.id] = call_row(key, call)

    def add_turn(self, key: CallKey, call: CallRecord, turn: TurnRecord) -> None:
        self.add_call(key, call)  # every batch carries the parents of its turns
        self.turns.append(turn_row(key, call, turn))
        self.models += [model_row(key, turn, n, m) for n, m in enumerate(turn.models)]
        self.tools += [tool_row(key, turn, n, t) for n, t in enumerate(turn.tools)]


def call_row(key: CallKey, call: CallRecord) -> Row:
    redact = key.redactor
    return {
        "id": key.id,
        "call_id": call.call_id,
        "socket_number": call.socket_number,
        "agent": call.agent,
        "started_at": _utc(call.started_at),
        "ended_at": None if call.ended_at is None else _utc(call.ended_at),
        "end_reason": call.end,
        "variables": redact.variables(call.variables),
        "tags": dict(call.tags),
    }


def turn_row(key: CallKey, call: CallRecord, turn: TurnRecord) -> Row:
    redact = key.redactor
    for tool in turn.tools:  # names first, so the texts below lose them too
        redact.learn_arguments(tool.arguments)
    timings = turn.timings_ms()
    return {
        "call_key": key.id,
        "response_id": turn.response_id,
        "kind": turn.kind,
        "outcome": turn.outcome,
        "at_ms": _ms(turn.arrived - call.started_perf),
        "caller_text": _cut(redact.text(turn.caller_text)),
        "spoken": _cut(redact.text(turn.spoken)),
        "action": turn.action,
        "error": turn.error,
        "llm_request_ms": timings["llm_request"],
        "first_token_ms": timings["first_token"],
        "first_frame_ms": timings["first_frame"],
        "complete_ms": timings["complete"],
        "input_tokens": _total(m.input_tokens for m in turn.models),
        "output_tokens": _total(m.output_tokens for m in turn.models),
        "speculation": turn.speculation,
        "speculation_wasted": turn.speculation_wasted,
        "speculative_requests": turn.speculative_requests,
    }


def model_row(key: CallKey, turn: TurnRecord, seq: int, model: ModelRecord) -> Row:
    return {
        "call_key": key.id,
        "response_id": turn.response_id,
        "seq": seq,
        "provider": model.provider,
        "model": model.model,
        "outcome": model.outcome,
        "requested_ms": _ms(model.requested - turn.arrived),
        "first_token_ms": None
        if model.first_token is None
        else _ms(model.first_token - turn.arrived),
        "input_tokens": model.input_tokens,
        "output_tokens": model.output_tokens,
        "failovers": list(model.failovers),
        "text": _cut(key.redactor.text(model.text)),
    }


def tool_row(key: CallKey, turn: TurnRecord, seq: int, tool: ToolRecord) -> Row:
    redact = key.redactor
    return {
        "call_key": key.id,
        "response_id": turn.response_id,
        "seq": seq,
        "name": tool.name,
        "arguments": _cut(redact.arguments(tool.arguments)),
        "outcome": tool.outcome,
        "replayed": tool.outcome == "replayed",
        "started_ms": _ms(tool.started - turn.arrived),
        "duration_ms": None if tool.duration_s is None else _ms(tool.duration_s),
        "action": tool.action,
        "result": _cut(redact.text(tool.result)),
    }


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _total(values: Any) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return text[:MAX_TEXT_CHARS] + f"... [{len(text) - MAX_TEXT_CHARS} more chars]"
