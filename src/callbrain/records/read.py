"""Reading calls back: the newest calls in short, and one call in full.

A call is every socket row with its ``call_id`` (a reconnect adds one), shown
as one call with its sockets in the order they opened. One call in full is a
plain dict, the shape ``callbrain calls show --json`` prints::

    {"call_id", "agent", "started_at", "ended_at", "duration_s", "end",
     "reconnects", "variables", "tags", "sockets": [{"socket_number", "started_at",
     "ended_at", "end", "variables", "tags"}],
     "turns": [{"socket_number", "response_id", "kind", "outcome", "at_ms",
                "caller_text", "spoken", "action", "error", "timings_ms":
                {"llm_request", "first_token", "first_frame", "complete"},
                "input_tokens", "output_tokens", "models": [...], "tools": [...]}]}

Times are ISO 8601 in UTC; ``at_ms`` is when the turn's request came,
counted from its socket's start; ``timings_ms`` count from that request.

:func:`call_from_record` gives a call still in memory (the console's live
view) the same shape, through the same rows and redaction as the database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, cast, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from callbrain.call.record import CallRecord
from callbrain.records.rows import CallKey, call_row, model_row, tool_row, turn_row
from callbrain.records.schema import calls, model_requests, tool_calls, turns
from callbrain.records.settings import Redaction

Call = dict[str, Any]
Row = Mapping[Any, Any]
"""A row as read (RowMapping) or as made for writing (dict)."""


async def list_calls(
    connection: AsyncConnection,
    *,
    agent: str | None = None,
    limit: int = 20,
    search: str | None = None,
    end: str | None = None,
    min_first_frame_ms: float | None = None,
    playground: bool | None = None,
) -> list[Call]:
    """The newest ``limit`` calls (of ``agent``), newest first, one summary each:
    start, duration, turns, worst first-frame latency, how it ended.

    ``search`` finds text in the call id, the agent's name or the variables (the
    caller's and the called numbers are there); ``end`` is how the call's last
    socket ended; ``min_first_frame_ms``, calls with a turn at least that slow to
    its first frame; ``playground``, only the console's calls (True) or none of them.
    """
    started = func.min(calls.c.started_at).label("started_at")
    newest: Select[Any] = select(calls.c.call_id, started).group_by(calls.c.call_id)
    if agent is not None:
        newest = newest.where(calls.c.agent == agent)
    newest = _filtered(newest, search, end, min_first_frame_ms, playground)
    newest = newest.order_by(started.desc()).limit(limit)
    ids = [row.call_id for row in await connection.execute(newest)]
    if not ids:
        return []
    sockets = await _sockets(connection, ids)
    counted = (
        select(
            calls.c.call_id,
            func.count().label("turns"),
            func.max(turns.c.first_frame_ms).label("worst_first_frame_ms"),
        )
        .join(turns, turns.c.call_key == calls.c.id)
        .where(calls.c.call_id.in_(ids), turns.c.kind != "begin")
        .group_by(calls.c.call_id)
    )
    figures = {row.call_id: row for row in await connection.execute(counted)}
    summaries = []
    for call_id in ids:
        summary = _summary(call_id, sockets[call_id])
        row = figures.get(call_id)
        summary["turns"] = row.turns if row else 0
        summary["worst_first_frame_ms"] = row.worst_first_frame_ms if row else None
        summaries.append(summary)
    return summaries


def _filtered(
    query: Select[Any],
    search: str | None,
    end: str | None,
    min_first_frame_ms: float | None,
    playground: bool | None,
) -> Select[Any]:
    if search:
        query = query.where(
            calls.c.call_id.icontains(search, autoescape=True)
            | calls.c.agent.icontains(search, autoescape=True)
            | cast(calls.c.variables, Text).icontains(search, autoescape=True)
        )
    if end is not None:
        later = calls.alias("later")
        last_socket = (
            select(func.max(later.c.socket_number))
            .where(later.c.call_id == calls.c.call_id)
            .scalar_subquery()
        )
        query = query.where(calls.c.end_reason == end, calls.c.socket_number == last_socket)
    if min_first_frame_ms is not None:
        slow = (
            select(calls.c.call_id)
            .join(turns, turns.c.call_key == calls.c.id)
            .where(turns.c.kind != "begin", turns.c.first_frame_ms >= min_first_frame_ms)
        )
        query = query.where(calls.c.call_id.in_(slow))
    if playground is not None:
        # Tags are a small JSON object; {"playground": true} is in its text either way.
        marked = select(calls.c.call_id).where(cast(calls.c.tags, Text).contains('"playground"'))
        query = query.where(
            calls.c.call_id.in_(marked) if playground else ~calls.c.call_id.in_(marked)
        )
    return query


async def load_call(connection: AsyncConnection, call_id: str) -> Call | None:
    """Everything recorded of one call (see the module docstring), or None."""
    sockets = (await _sockets(connection, [call_id])).get(call_id)
    if not sockets:
        return None
    keys = {row["id"]: row["socket_number"] for row in sockets}
    order = {row["id"]: n for n, row in enumerate(sockets)}
    models = await _children(connection, model_requests, keys)
    tools = await _children(connection, tool_calls, keys)
    rows = await connection.execute(select(turns).where(turns.c.call_key.in_(keys)))
    found = sorted(rows.mappings(), key=lambda t: (order[t["call_key"]], t["at_ms"]))
    call = _summary(call_id, sockets)
    call["sockets"] = [_socket(row) for row in sockets]
    call["turns"] = [
        _turn(t, keys[t["call_key"]], models[t["call_key"], t["response_id"]], tools) for t in found
    ]
    return call


def call_from_record(
    record: CallRecord, redaction: Redaction = "none", *, with_turns: bool = True
) -> Call:
    """A call in memory (one socket, in progress or just ended) in the shape of
    :func:`load_call`, made through the same rows and redaction as the database's
    (without ``sockets`` and ``turns`` unless ``with_turns``)."""
    key = CallKey.new(redaction)
    row = call_row(key, record)
    if not with_turns:
        return _summary(record.call_id, [row])
    tools: dict[tuple[str, int], Sequence[Row]] = {}
    turn_list = []
    for turn in list(record.turns):
        shaped = turn_row(key, record, turn)  # learns the names first, for the rest
        models = [model_row(key, turn, n, m) for n, m in enumerate(turn.models)]
        tools[key.id, turn.response_id] = [
            tool_row(key, turn, n, t) for n, t in enumerate(turn.tools)
        ]
        turn_list.append(_turn(shaped, record.socket_number, models, tools))
    call = _summary(record.call_id, [row])
    call["sockets"] = [_socket(row)]
    call["turns"] = turn_list
    return call


async def _sockets(connection: AsyncConnection, ids: list[str]) -> dict[str, list[RowMapping]]:
    query = (
        select(calls)
        .where(calls.c.call_id.in_(ids))
        .order_by(calls.c.started_at, calls.c.socket_number)
    )
    found: dict[str, list[RowMapping]] = defaultdict(list)
    for row in (await connection.execute(query)).mappings():
        found[row["call_id"]].append(row)
    return found


async def _children(
    connection: AsyncConnection, table: Any, keys: dict[str, int]
) -> defaultdict[tuple[str, int], list[RowMapping]]:
    query = select(table).where(table.c.call_key.in_(keys)).order_by(table.c.seq)
    found: defaultdict[tuple[str, int], list[RowMapping]] = defaultdict(list)
    for row in (await connection.execute(query)).mappings():
        found[row["call_key"], row["response_id"]].append(row)
    return found


def _summary(call_id: str, sockets: Sequence[Row]) -> Call:
    first, last = sockets[0], sockets[-1]
    started, ended = _utc(first["started_at"]), _utc(last["ended_at"])
    return {
        "call_id": call_id,
        "agent": last["agent"],
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_s": None if ended is None or started is None else _seconds(ended - started),
        "end": last["end_reason"],
        "reconnects": len(sockets) - 1,
        "variables": last["variables"],
        "tags": last["tags"],
    }


def _socket(row: Row) -> dict[str, Any]:
    return {
        "socket_number": row["socket_number"],
        "started_at": _iso(_utc(row["started_at"])),
        "ended_at": _iso(_utc(row["ended_at"])),
        "end": row["end_reason"],
        "variables": row["variables"],
        "tags": row["tags"],
    }


def _turn(
    row: Row,
    socket_number: int,
    models: Sequence[Row],
    tools: Mapping[tuple[str, int], Sequence[Row]],
) -> dict[str, Any]:
    return {
        "socket_number": socket_number,
        "response_id": row["response_id"],
        "kind": row["kind"],
        "outcome": row["outcome"],
        "at_ms": row["at_ms"],
        "caller_text": row["caller_text"],
        "spoken": row["spoken"],
        "action": row["action"],
        "error": row["error"],
        "timings_ms": {
            "llm_request": row["llm_request_ms"],
            "first_token": row["first_token_ms"],
            "first_frame": row["first_frame_ms"],
            "complete": row["complete_ms"],
        },
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "speculation": row["speculation"],
        "speculation_wasted": row["speculation_wasted"],
        "speculative_requests": row["speculative_requests"],
        "models": [
            {
                "provider": m["provider"],
                "model": m["model"],
                "outcome": m["outcome"],
                "requested_ms": m["requested_ms"],
                "first_token_ms": m["first_token_ms"],
                "input_tokens": m["input_tokens"],
                "output_tokens": m["output_tokens"],
                "failovers": m["failovers"],
                "text": m["text"],
            }
            for m in models
        ],
        "tools": [
            {
                "name": t["name"],
                "arguments": t["arguments"],
                "outcome": t["outcome"],
                "replayed": t["replayed"],
                "started_ms": t["started_ms"],
                "duration_ms": t["duration_ms"],
                "action": t["action"],
                "result": t["result"],
            }
            for t in tools[row["call_key"], row["response_id"]]
        ],
    }


def _utc(value: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _seconds(delta: Any) -> float:
    return round(float(delta.total_seconds()), 3)
