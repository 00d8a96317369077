"""The records tables: migrations that agree with the code, and retention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from records_support import read_list
from sqlalchemy import text

from callbrain.call.record import CallRecord, ModelRecord, ToolRecord, TurnRecord
from callbrain.records.database import _alembic_config, check_schema, migrate, open_engine
from callbrain.records.recorder import CallRecorder
from callbrain.records.schema import metadata
from callbrain.records.settings import RecordsSettings, database_url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "calls.db")
    return str(request.getfixturevalue("postgres_url"))


HEAD = "0002"


async def test_a_database_made_by_an_earlier_release_is_upgraded_in_place(database: str) -> None:
    engine = open_engine(database_url(database))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(lambda c: _upgrade_to(c, "0001"))
            for insert in (
                "INSERT INTO calls (id, call_id, socket_number, agent, started_at, "
                "end_reason, variables, tags) "
                "VALUES ('k', 'c', 1, 'a', CURRENT_TIMESTAMP, 'hangup', '{}', '{}')",
                "INSERT INTO turns (call_key, response_id, kind, outcome, at_ms, caller_text, "
                "spoken) VALUES ('k', 1, 'response', 'completed', 0, 'Hi', 'Hello')",
            ):
                await connection.execute(text(insert))
        assert await migrate(engine) == "0001"
        await check_schema(engine)
        async with engine.connect() as connection:
            row = (await connection.execute(text("SELECT * FROM turns"))).mappings().one()
        assert row["spoken"] == "Hello" and row["speculation"] is None
        assert row["speculation_wasted"] == 0
    finally:
        await engine.dispose()


def _upgrade_to(connection: Any, revision: str) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)


async def test_the_migrations_make_exactly_the_tables_the_code_uses(database: str) -> None:
    engine = open_engine(database_url(database))
    try:
        assert await migrate(engine) is None  # a new database
        assert await migrate(engine) == HEAD  # the second run changes nothing
        await check_schema(engine)
        async with engine.connect() as connection:
            differences = await connection.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), metadata)
            )
        assert differences == []
    finally:
        await engine.dispose()


def full_call(call_id: str, days_ago: float) -> CallRecord:
    """A finished call with a turn, a model request and a tool call."""
    call = CallRecord(call_id, "aged", started_at=time.time() - days_ago * 86400)
    turn = TurnRecord(1, "response", arrived=call.started_perf, outcome="completed")
    turn.models.append(ModelRecord("openai", "m", requested=call.started_perf))
    turn.tools.append(ToolRecord("lookup", "{}", started=call.started_perf, duration_s=0.01))
    call.turns.append(turn)
    call.end, call.ended_at = "hangup", call.started_at + 60
    return call


async def test_calls_past_their_retention_go_with_all_their_rows(database: str) -> None:
    recorder = CallRecorder(RecordsSettings(url=database, retention_days=7))
    await recorder.start()
    for call in (full_call("old", days_ago=8), full_call("recent", days_ago=6)):
        recorder.call_started(call)
        recorder.turn_ended(call, call.turns[0])
        recorder.call_ended(call)
    await recorder.flush()
    assert recorder.written == 6
    assert await recorder.purge_expired() == 1
    assert await recorder.purge_expired() == 0
    await recorder.aclose()
    assert [c["call_id"] for c in await read_list(database)] == ["recent"]
    engine = open_engine(database_url(database), for_reading=True)
    try:
        async with engine.connect() as connection:
            for table in metadata.sorted_tables:
                rows = (await connection.execute(table.select())).all()
                assert len(rows) == 1, table.name  # only the recent call's
    finally:
        await engine.dispose()
