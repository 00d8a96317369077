"""Reading calls back: the newest calls in short, and one call in full.

A call is every socket row with its ``call_id`` (a reconnect adds one), shown
as one call with its sockets in the order they opened. One call in full is a
plain dict, the shape ``callbrain calls show --json`` prints::

    {"call_id", "agent", "started_at", "ended_at", "duration_s", "end",
     "reconnects", "variables", "sockets": [{"socket_number", "started_at",
     "ended_at", "end", "variables", "tags"}],
     "turns": [{"socket_number", "response_id", "kind", "outcome", "at_ms",
                "caller_text", "spoken", "action", "error", "timings_ms":
                {"llm_request", "first_token", "first_frame", "complete"},
                "input_tokens", "output_tokens", "models": [...], "tools": [...]}]}

Times are ISO 8601 in UTC; ``at_ms`` is when the turn's request came,
counted from its socket's start; ``timings_ms`` count from that request.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from callbrain.records.schema import calls, model_requests, tool_calls, turns

Call = dict[str, Any]


async def list_calls(
    connection: AsyncConnection, *, agent: str | None = None, limit: int = 20
) -> list[Call]:
    """The newest ``limit`` calls (of ``agent``), newest first, one summary each:
    start, duration, turns, worst first-frame latency, how it ended."""
    started = func.min(calls.c.started_at).label("started_at")
    newest = select(calls.c.call_id, started).group_by(calls.c.call_id)
    if agent is not None:
        newest = newest.where(calls.c.agent == agent)
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


def _summary(call_id: str, sockets: list[RowMapping]) -> Call:
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
    }


def _socket(row: RowMapping) -> dict[str, Any]:
    return {
        "socket_number": row["socket_number"],
        "started_at": _iso(_utc(row["started_at"])),
        "ended_at": _iso(_utc(row["ended_at"])),
        "end": row["end_reason"],
        "variables": row["variables"],
        "tags": row["tags"],
    }


def _turn(
    row: RowMapping,
    socket_number: int,
    models: list[RowMapping],
    tools: defaultdict[tuple[str, int], list[RowMapping]],
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
