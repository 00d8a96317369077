"""Writing a batch of rows, and deleting what is past its retention.

Every row is an upsert: a call's row is written when its socket opens and
again with each batch that carries its turns and when it ends, and a batch
that is retried after a timeout must not fail on what half-arrived before.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from callbrain.records.rows import Batch
from callbrain.records.schema import CHILDREN_FIRST, calls, model_requests, tool_calls, turns


async def write_batch(connection: AsyncConnection, batch: Batch) -> None:
    """Write ``batch`` on ``connection`` (the caller commits)."""
    dialect = connection.dialect.name
    for table, rows in (
        (calls, list(batch.calls.values())),
        (turns, batch.turns),
        (model_requests, batch.models),
        (tool_calls, batch.tools),
    ):
        if rows:
            await connection.execute(_upsert(table, dialect), rows)


@cache
def _upsert(table: Table, dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table)
    keys = [column.name for column in table.primary_key]
    return statement.on_conflict_do_update(
        index_elements=keys,
        set_={c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys},
    )


async def purge(connection: AsyncConnection, older_than: datetime) -> int:
    """Delete the calls that started before ``older_than`` and all of their rows;
    returns how many call rows (sockets) went."""
    old = select(calls.c.id).where(calls.c.started_at < older_than).scalar_subquery()
    deleted = 0
    for table in CHILDREN_FIRST:
        column = table.c.id if table is calls else table.c.call_key
        result = await connection.execute(delete(table).where(column.in_(old)))
        deleted = result.rowcount
    return deleted
