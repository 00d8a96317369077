"""The recorder when the database is not there, locked, slow or out of date:
calls go on untouched, what cannot be written is counted and logged (a line a
minute at most), and writing resumes when the database does."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from records_support import clinic_agent, read_call

from callbrain.call.record import CallRecord, TurnRecord
from callbrain.extras import MissingExtraError
from callbrain.records import open_recorder
from callbrain.records.recorder import CallRecorder
from callbrain.records.settings import RecordsSettings
from callbrain.server.app import create_app
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.serve import serve_asgi


@contextlib.asynccontextmanager
async def served(fake: FakeOpenAIServer, settings: RecordsSettings) -> AsyncIterator[Any]:
    """The agent on loopback; yields its Retell URL and its runtime (with the recorder)."""
    app = create_app(clinic_agent(fake, settings))
    async with serve_asgi(app) as http:
        yield "ws" + http.removeprefix("http") + "/llm-websocket", app.state.runtime


async def settled(runtime: Any) -> CallRecorder:
    """Once the server has seen every call end, wait for their records' fate."""
    await runtime.idle.wait()
    recorder: CallRecorder = runtime.recorder
    await recorder.flush()
    return recorder


async def talk(url: str, call_id: str, turns: int) -> None:
    """A call whose every reply must complete, whatever the database does."""
    async with RetellClient.connect(url, call_id) as call:
        await call.expect_config()
        await call.expect_begin()
        for n in range(turns):
            reply = await call.ask(f"Question {n}?")
            assert reply.text == "Answer." and reply.completes == 1
        assert not call.checker.violations


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "callbrain.records" and "dropped since the start" in r.getMessage()
    ]


async def test_a_database_that_cannot_open_costs_records_not_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = RecordsSettings(url=str(blocker / "calls.db"), flush_interval_s=0.01)
    caplog.set_level(logging.WARNING, "callbrain.records")
    async with (
        FakeOpenAIServer(default=Reply("Answer.")) as fake,
        served(fake, settings) as (url, runtime),
    ):
        for n in range(3):
            await talk(url, f"unrecorded-{n}", turns=3)
        recorder = await settled(runtime)
        # Every record went: 3 calls x (start, greeting, 3 turns, end).
        assert recorder.dropped == 3 * 6
        assert recorder.written == 0
    assert any("cannot use the database" in r.getMessage() for r in caplog.records)
    warnings = drop_warnings(caplog)
    # Rate-limited: the first drop at once, the rest in the line written at shutdown.
    assert 1 <= len(warnings) <= 2
    assert "18 dropped since the start" in warnings[-1]
    assert "unable to open database file" in warnings[0]


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Any:
    """Another process's write transaction holds the SQLite file."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextlib.asynccontextmanager
async def postgres_locked(url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session holds the calls table: every write to it waits."""
    holder = await asyncpg.connect(url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
    try:
        yield holder
    finally:
        await transaction.rollback()
        await holder.close()


async def test_a_locked_sqlite_file_holds_no_reply_back_and_loses_what_timed_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "calls.db"
    settings = RecordsSettings(url=str(path), write_timeout_s=0.2, flush_interval_s=0.01)
    async with (
        FakeOpenAIServer(default=Reply("Answer.")) as fake,
        served(fake, settings) as (url, runtime),
    ):
        assert path.is_file()  # made at start-up
        with sqlite_locked(path):
            await talk(url, "while-locked", turns=3)
            recorder = await settled(runtime)
            lost = recorder.dropped
            assert lost >= 1 and recorder.written == 0
        await talk(url, "after-unlock", turns=2)
    assert recorder.dropped == lost
    assert len((await read_call(str(path), "after-unlock"))["turns"]) == 3
    assert any("did not answer in time" in w for w in drop_warnings(caplog))


async def test_a_hung_postgresql_holds_no_reply_back_and_gets_everything_later(
    postgres_url: str,
) -> None:
    """The writer waits on a lock for the whole call; the call does not notice,
    and once the lock goes, every record is written."""
    settings = RecordsSettings(url=postgres_url, write_timeout_s=60, flush_interval_s=0.01)
    async with (
        FakeOpenAIServer(default=Reply("Answer.")) as fake,
        served(fake, settings) as (url, runtime),
    ):
        recorder = runtime.recorder
        async with postgres_locked(postgres_url) as holder:
            async with RetellClient.connect(url, "while-hung") as call:
                await call.expect_config()
                await call.expect_begin()
                await wait_for_a_blocked_write(holder)
                for n in range(3):
                    reply = await call.ask(f"Question {n}?")
                    assert reply.completes == 1
            assert recorder.written == 0
        await settled(runtime)
        assert recorder.dropped == 0
    call_record = await read_call(postgres_url, "while-hung")
    assert call_record["end"] == "hangup"
    assert [t["caller_text"] for t in call_record["turns"][1:]] == [
        f"Question {n}?" for n in range(3)
    ]


async def wait_for_a_blocked_write(holder: asyncpg.Connection) -> None:
    """Until PostgreSQL shows another session waiting for the lock we hold."""
    deadline = time.monotonic() + 10
    query = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
    while await holder.fetchval(query) == 0:
        assert time.monotonic() < deadline, "the recorder never tried to write"
        await holder.execute("SELECT pg_sleep(0.02)")


async def test_tables_out_of_date_with_migrate_off_are_reported_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RecordsSettings(url=str(tmp_path / "empty.db"), migrate=False)
    async with (
        FakeOpenAIServer(default=Reply("Answer.")) as fake,
        served(fake, settings) as (url, runtime),
    ):
        await talk(url, "no-tables", turns=1)
        recorder = await settled(runtime)
        assert recorder.dropped == 4  # start, greeting, one turn, end
    assert any("callbrain calls migrate" in r.getMessage() for r in caplog.records)


def test_postgresql_without_its_driver_names_the_extra() -> None:
    # psycopg is not installed here (asyncpg is the driver the extra brings).
    with pytest.raises(MissingExtraError, match=r"callbrain\[records\]"):
        open_recorder(RecordsSettings(url="postgresql+psycopg://localhost/calls"))


async def test_a_full_queue_drops_the_newest_and_counts_them(tmp_path: Path) -> None:
    recorder = CallRecorder(RecordsSettings(url=str(tmp_path / "calls.db"), max_queue=2))
    call = CallRecord("queued", "agent")
    turns = [TurnRecord(n, "response", arrived=call.started_perf) for n in range(1, 4)]
    recorder.call_started(call)
    for turn in turns:  # no await in between: the writer cannot drain the queue
        recorder.turn_ended(call, turn)
    assert recorder.dropped == 2
    await recorder.aclose()
    assert recorder.written == 2
    assert [
        t["response_id"] for t in (await read_call(str(tmp_path / "calls.db"), "queued"))["turns"]
    ] == [1]
