"""The web console's calls over real sockets, without a browser: a playground
call, the live events, the calls list's filters (on SQLite and PostgreSQL),
the scenario download, the live feed's bounds and redaction. Who may use the
console is test_console_access.py; the pages in a browser, test_console_browser.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import yaml
from console_support import (
    client,
    console,
    console_agent,
    playground_call,
    recorded,
    serve_console,
)

from callbrain.call.record import CallRecord, TurnRecord
from callbrain.console.live import LiveFeed
from callbrain.records.export import export_scenario, scenario_yaml
from callbrain.records.settings import RecordsSettings
from callbrain.testing import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply


async def test_a_playground_call_is_served_like_retells_and_recorded_as_playground(
    tmp_path: Path,
) -> None:
    replies = [
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "tuesday"})]),
        Reply("Tuesday at nine."),
    ]
    options = {"wait_for_call_details": True}
    async with console(tmp_path, *replies, **options) as (served, _), client(served) as http:
        async with playground_call(served, http, "playground-abc123") as call:
            await call.expect_config()
            await call.send_call_details({"retell_llm_dynamic_variables": {"first_name": "Robin"}})
            assert "Robin" in (await call.expect_begin()).text
            reply = await call.ask("Anything on Tuesday?")
            assert reply.text.endswith("Tuesday at nine.")
            assert call.checker.violations == []
        await recorded(served)
        found = (await http.get("/console/calls?kind=playground")).text
        assert "playground-abc123" in found
        assert "playground-abc123" not in (await http.get("/console/calls?kind=calls")).text
        page = (await http.get("/console/calls/playground-abc123")).text
        assert "check_availability" in page and "Tuesday at nine." in page


# --------------------------------------------------------------------- calls


async def test_live_events_follow_a_call_from_start_to_end(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        events: list[dict[str, object]] = []
        snapshot = asyncio.Event()
        ended = asyncio.Event()

        async def watch() -> None:
            async with http.stream("GET", "/console/events") as stream:
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        data = orjson.loads(line.removeprefix("data: "))
                        if kind == "snapshot":
                            snapshot.set()
                        else:
                            events.append(data)
                            if data["end"] != "open":
                                ended.set()
                                return

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(snapshot.wait(), 5)
        async with RetellClient.connect(served.retell_url, "call_live_1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hello?")
        await asyncio.wait_for(ended.wait(), 5)
        await watcher
        assert all(e["call_id"] == "call_live_1" for e in events)
        assert events[0]["live"] is True
        assert any(e["responding"] for e in events)
        last = events[-1]
        assert last["live"] is False and last["end"] == "hangup" and last["turns"] == 1


async def test_the_event_stream_ends_when_the_server_drains(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        async with http.stream("GET", "/console/events") as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            served.app.state.runtime.draining = True
            rest = [line async for line in lines]  # the stream ends by itself
        assert all(not line.startswith("data: ") for line in rest)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The records database: the search casts JSON to text, which each does its way."""
    if request.param == "sqlite":
        return str(tmp_path / "calls.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_the_calls_list_searches_and_filters(tmp_path: Path, database: str) -> None:
    slow = Reply("Let me see.", ttft=0.3)
    async with console(tmp_path, slow, database=database) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_slow_1") as call:
            await call.expect_config()
            await call.send_call_details({"from_number": "+14155550199", "to_number": "+1415"})
            await call.expect_begin()
            await call.ask("Hello?")
        async with playground_call(served, http, "playground-quick1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hi?")
            await call.close()
        await recorded(served)

        async def listed(query: str) -> set[str]:
            page = (await http.get(f"/console/calls{query}")).text
            return {cid for cid in ("call_slow_1", "playground-quick1") if cid in page}

        assert await listed("") == {"call_slow_1", "playground-quick1"}
        assert await listed("?q=5550199") == {"call_slow_1"}  # the caller's number
        assert await listed("?q=QUICK") == {"playground-quick1"}
        assert await listed("?kind=playground") == {"playground-quick1"}
        assert await listed("?kind=calls") == {"call_slow_1"}
        assert await listed("?min_ms=250") == {"call_slow_1"}
        assert await listed("?end=hangup") == {"call_slow_1", "playground-quick1"}
        assert await listed("?end=drop") == set()
        assert await listed("?q=%25") == set()  # a LIKE wildcard is just a character


async def test_the_scenario_download_is_callbrain_calls_export(tmp_path: Path) -> None:
    from callbrain.records.read import load_call
    from callbrain.records.settings import database_url

    replies = [
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "friday"})]),
        Reply("Friday at three."),
    ]
    async with console(tmp_path, *replies) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_export_1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Friday?")
        await recorded(served)
        answer = await http.get("/console/calls/call_export_1/scenario.yaml")
        assert answer.headers["content-disposition"] == 'attachment; filename="call_export_1.yaml"'
        from callbrain.records.database import open_engine

        engine = open_engine(database_url(str(tmp_path / "calls.db")), for_reading=True)
        async with engine.connect() as connection:
            stored = await load_call(connection, "call_export_1")
        await engine.dispose()
        assert stored is not None
        assert answer.text == scenario_yaml(export_scenario(stored))
        assert yaml.safe_load(answer.text)["steps"][0]["expect"]["tools"][0]["name"] == (
            "check_availability"
        )


async def test_a_call_that_just_ended_is_shown_whole_before_its_records_are_written(
    tmp_path: Path,
) -> None:
    # Written only when flushed: the database is behind at will.
    slow_writes = RecordsSettings(url=str(tmp_path / "calls.db"), flush_interval_s=3600)
    replies = [Reply("First answer."), Reply("Second answer.")]
    served_console = console(tmp_path, *replies, database=slow_writes)
    async with served_console as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_behind") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("One?")
            await served.app.state.runtime.recorder.flush()  # the first turn only
            await call.ask("Two?")
        await asyncio.wait_for(served.app.state.runtime.idle.wait(), 10)
        page = (await http.get("/console/calls/call_behind")).text
        assert "Second answer." in page and "hangup" in page
        await served.app.state.runtime.recorder.flush()
        page = (await http.get("/console/calls/call_behind")).text
        assert "Second answer." in page


async def test_a_turn_that_failed_shows_why_and_the_caller_heard_the_fallback(
    tmp_path: Path,
) -> None:
    async with (
        console(tmp_path, Reply(status=500)) as (served, _),
        client(served) as http,
        RetellClient.connect(served.retell_url, "call_failing") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
        await call.ask("Hello?")
        page = (await http.get("/console/calls/call_failing")).text
    assert 'class="error-line"' in page and "500" in page
    assert "outcome-fallback" in page


async def test_with_records_off_the_last_calls_are_still_shown(tmp_path: Path) -> None:
    async with console(tmp_path, records=False) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_no_db") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hello?")
        page = (await http.get("/console/calls")).text
        assert "call_no_db" in page and "records are off" in page
        assert (await http.get("/console/calls/call_no_db")).status_code == 200
        assert (await http.get("/console/calls/call_unknown")).status_code == 404


# ------------------------------------------------------------------ live feed


def test_a_browser_that_does_not_keep_up_costs_its_queue_and_is_sent_a_snapshot() -> None:
    feed = LiveFeed(queue_events=8, max_watchers=2)
    slow, other = feed.watch(), feed.watch()
    assert slow is not None and other is not None
    assert feed.watch() is None  # max_watchers
    call = CallRecord("call_busy", "clinic")
    feed.call_started(call)
    for n in range(1, 1000):
        turn = TurnRecord(n, "response", arrived=time.perf_counter())
        call.turns.append(turn)
        feed.turn_started(call, turn)
        feed.turn_ended(call, turn)
    assert len(slow.events) <= 8 and slow.lagged  # dropped, to be resynced
    snapshot = orjson.loads(feed.snapshot().split(b"data: ", 1)[1])
    assert snapshot["calls"][0]["turns"] == 999
    feed.unwatch(slow)
    feed.unwatch(other)
    feed.call_ended(call)  # nobody watching: nothing made, nothing queued
    assert feed.find("call_busy") is call and not feed.open


async def test_the_live_view_is_redacted_like_the_records(tmp_path: Path) -> None:
    options = {"console": {}}
    async with FakeOpenAIServer(Reply("Booked for 555 0199.")) as fake:
        agent = console_agent(fake, tmp_path / "calls.db", **options)
        records = RecordsSettings(url=str(tmp_path / "calls.db"), redact="pii")
        agent = agent.model_copy(
            update={"server": agent.server.model_copy(update={"records": records})}
        )
        async with serve_console(agent) as served, client(served) as http:
            async with RetellClient.connect(served.retell_url, "call_pii") as call:
                await call.expect_config()
                await call.send_call_details({"from_number": "+14155550199"})
                await call.expect_begin()
                await call.ask("My number is 415 555 0199")
                live = (await http.get("/console/calls/call_pii")).text
                listed = (await http.get("/console/calls")).text
            for page in (live, listed):
                assert "0199" not in page and "[number]" in page
