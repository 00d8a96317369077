"""The call flight recorder on real databases: SQLite on disk and PostgreSQL.

Calls go through the whole server (real sockets, the real OpenAI SDK against
the fake provider, the clinic's real tools); the records are read back with
the same code ``callbrain calls`` uses. A server's records are all written
once its app has stopped (the recorder writes what is left on shutdown), so
the tests read after the ``serve_agent`` block, never after a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from records_support import (
    FULL_ANSWER,
    booking_call,
    booking_replies,
    clinic_agent,
    read_call,
    read_list,
)

from callbrain.examples import clinic_tools
from callbrain.records.settings import RecordsSettings
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply


@pytest.fixture(autouse=True)
def _empty_calendar() -> Iterator[None]:
    clinic_tools._booked.clear()
    yield
    clinic_tools._booked.clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A records database of this test's own: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "calls.db")
    return str(request.getfixturevalue("postgres_url"))


async def test_every_turn_is_recorded_with_what_was_said_cut_off_and_run(database: str) -> None:
    async with FakeOpenAIServer(*booking_replies()) as fake:
        agent = clinic_agent(fake, RecordsSettings(url=database))
        async with serve_agent(agent) as url:
            await booking_call(url, "call-rec-1")
    call = await read_call(database, "call-rec-1")

    assert call["agent"] == "records-clinic"
    assert call["end"] == "hangup"
    assert call["reconnects"] == 0
    assert call["variables"] == {"first_name": "Sam", "call_id": "call-rec-1"}
    assert call["duration_s"] > 0
    begin, cut, booked, repeat = call["turns"]
    assert [t["kind"] for t in call["turns"]] == ["begin", "response", "response", "response"]
    assert [t["outcome"] for t in call["turns"]] == ["completed", "superseded", *["completed"] * 2]
    assert begin["spoken"] == "Hi Sam, Sunrise Clinic."

    # The cut-off turn: what the caller heard is what was sent before the cut.
    assert cut["caller_text"] == "Anything on Tuesday?"
    heard = "Let me check the calendar. " + FULL_ANSWER
    assert "Tuesday" in cut["spoken"]
    assert heard.startswith(cut["spoken"]) and len(cut["spoken"]) < len(heard)
    [looked] = cut["tools"]
    assert looked["name"] == "check_availability"
    assert looked["arguments"] == '{"day":"tuesday"}'
    assert (looked["outcome"], looked["replayed"]) == ("ok", False)
    assert looked["result"] == "Free on Tuesday: 09:00, 10:30, 13:00, 15:30, 17:00."
    assert looked["duration_ms"] >= 0
    assert [m["text"] for m in cut["models"]] == ["", cut["spoken"].split("calendar. ")[1]]

    # The booking: tool, model and tokens (the fake reports 12 in, 7 out per request).
    assert booked["caller_text"] == "Ten thirty please, I'm Sam Lee."
    assert booked["spoken"] == "Let me book that for you. You're booked, Sam."
    [booking] = booked["tools"]
    assert (booking["name"], booking["outcome"], booking["replayed"]) == (
        "book_appointment",
        "ok",
        False,
    )
    assert booking["result"] == "Booked Sam Lee on Tuesday at 10:30."
    assert [(m["provider"], m["model"], m["outcome"]) for m in booked["models"]] == [
        ("openai", "gpt-4o-mini", "ok")
    ] * 2
    assert [(m["input_tokens"], m["output_tokens"]) for m in booked["models"]] == [(12, 7)] * 2
    assert (booked["input_tokens"], booked["output_tokens"]) == (24, 14)
    assert booked["models"][0]["failovers"] == []

    # The same booking again: served from the idempotency store, not run twice.
    [again] = repeat["tools"]
    assert (again["name"], again["outcome"], again["replayed"]) == (
        "book_appointment",
        "replayed",
        True,
    )
    assert clinic_tools._booked == {("tuesday", "10:30"): "Sam Lee"}

    # Turns are in the order their requests came, each timed from its request.
    assert [t["at_ms"] for t in call["turns"]] == sorted(t["at_ms"] for t in call["turns"])
    for turn in (booked, repeat):
        timings = turn["timings_ms"]
        assert set(timings) == {"llm_request", "first_token", "first_frame", "complete"}
        assert 0 <= timings["llm_request"] <= timings["first_token"] <= timings["complete"]
        assert timings["first_frame"] <= timings["complete"]
    assert cut["timings_ms"]["complete"] is None


async def test_calls_are_listed_newest_first_with_their_worst_first_frame(database: str) -> None:
    async with FakeOpenAIServer(Reply("Slow.", ttft=0.25), default=Reply("Quick.")) as fake:
        agent = clinic_agent(fake, RecordsSettings(url=database))
        async with serve_agent(agent) as url:
            for call_id in ("first-call", "second-call"):
                async with RetellClient.connect(url, call_id) as call:
                    await call.expect_config()
                    await call.expect_begin()
                    await call.ask("Hello?")
                    await call.ask("Are you there?")
        other = agent.model_copy(update={"name": "other-agent"})
        async with serve_agent(other) as url, RetellClient.connect(url, "third-call") as call:
            await call.expect_config()

    listed = await read_list(database)
    assert [c["call_id"] for c in listed] == ["third-call", "second-call", "first-call"]
    first = listed[2]
    assert (first["agent"], first["turns"], first["end"], first["reconnects"]) == (
        "records-clinic",
        2,
        "hangup",
        0,
    )
    # The slow first reply (250 ms to its first token) cannot be faster than that,
    # and each call's worst turn is the slowest of its recorded turns.
    assert first["worst_first_frame_ms"] >= 250
    for listed_call in listed[1:]:
        recorded = await read_call(database, listed_call["call_id"])
        frames = [t["timings_ms"]["first_frame"] for t in recorded["turns"]]
        frames = [f for f in frames if f is not None]
        assert listed_call["worst_first_frame_ms"] == pytest.approx(max(frames), abs=0.1)
    assert listed[0]["turns"] == 0 and listed[0]["worst_first_frame_ms"] is None
    assert [c["call_id"] for c in await read_list(database, agent="other-agent")] == ["third-call"]
    assert len(await read_list(database, limit=1)) == 1


async def test_a_reconnect_is_one_call_with_its_sockets_in_order(database: str) -> None:
    async with FakeOpenAIServer(default=Reply("Go on.")) as fake:
        agent = clinic_agent(fake, RecordsSettings(url=database))
        async with serve_agent(agent) as url, RetellClient.connect(url, "dropped-call") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Before the drop.")
            call._ws.transport.abort()  # no close frame: a dropped line
            async with RetellClient.connect(url, "dropped-call") as call:
                await call.expect_config()
                await call.expect_begin()  # completed empty: no second greeting
                await call.ask("After the drop.")

    call = await read_call(database, "dropped-call")
    assert call["reconnects"] == 1
    assert [(s["socket_number"], s["end"]) for s in call["sockets"]] == [(1, "drop"), (2, "hangup")]
    assert call["end"] == "hangup"
    assert [(t["socket_number"], t["kind"], t["caller_text"]) for t in call["turns"]] == [
        (1, "begin", ""),
        (1, "response", "Before the drop."),
        (2, "begin", ""),
        (2, "response", "After the drop."),
    ]
    assert [c["call_id"] for c in await read_list(database)] == ["dropped-call"]


async def test_recording_off_writes_nothing(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        agent = clinic_agent(fake, False)
        async with serve_agent(agent) as url, RetellClient.connect(url, "unrecorded") as call:
            await call.expect_config()
            await call.expect_begin()
    assert not any(tmp_path.rglob("*.db"))  # noqa: ASYNC240 - a test's own tmp_path
    assert agent.server.records is False


async def test_the_default_database_is_in_the_users_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    async with (
        FakeOpenAIServer() as fake,
        serve_agent(clinic_agent(fake, True)) as url,
        RetellClient.connect(url, "default-place") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
    default = tmp_path / "data" / "callbrain" / "calls.db"
    assert default.is_file()
    assert (await read_call(str(default), "default-place"))["end"] == "hangup"


def test_the_records_setting_is_checked_when_the_agent_loads() -> None:
    from callbrain.agent import Agent
    from callbrain.errors import AgentConfigError

    for records, problem in (
        ("{url: mysql://db/calls}", "unsupported database 'mysql'"),
        ("{retention_days: 0}", "retention_days"),
        ("{redact: names}", "redact"),
        ("{uri: x}", "uri"),
    ):
        text = f"name: x\nllm: {{provider: openai}}\nserver:\n  records: {records}\n"
        with pytest.raises(AgentConfigError, match=problem):
            Agent.from_yaml_text(text)
    text = "name: x\nllm: {provider: openai}\nserver: {records: false}\n"
    assert Agent.from_yaml_text(text).server.records is False


async def test_many_calls_at_once_are_all_written(tmp_path: Path) -> None:
    """Batches of several calls' turns, interleaved, in a few transactions."""
    database = str(tmp_path / "calls.db")
    settings = RecordsSettings(url=database, batch_size=7)
    async with (
        FakeOpenAIServer(default=Reply("Sure.")) as fake,
        serve_agent(clinic_agent(fake, settings)) as url,
    ):

        async def one(n: int) -> None:
            async with RetellClient.connect(url, f"many-{n}") as call:
                await call.expect_config()
                await call.expect_begin()
                for _ in range(3):
                    await call.ask(f"Question from caller {n}.")

        await asyncio.gather(*(one(n) for n in range(12)))
    listed = await read_list(database, limit=100)
    assert sorted(c["call_id"] for c in listed) == sorted(f"many-{n}" for n in range(12))
    assert {c["turns"] for c in listed} == {3}
    assert all(c["end"] == "hangup" for c in listed)


async def test_failovers_and_the_fallback_line_are_on_the_record(tmp_path: Path) -> None:
    database = str(tmp_path / "calls.db")
    async with (
        FakeOpenAIServer(Reply(status=500), Reply(status=500)) as primary,
        FakeOpenAIServer(Reply("From the backup."), Reply(status=500)) as backup,
    ):
        agent = clinic_agent(primary, RecordsSettings(url=database))
        spare = agent.llm.model_copy(update={"base_url": backup.base_url, "model": "backup-model"})
        agent = agent.model_copy(update={"fallback_llms": [spare]})
        async with serve_agent(agent) as url, RetellClient.connect(url, "failing") as call:
            await call.expect_config()
            await call.expect_begin()
            assert (await call.ask("First?")).text == "From the backup."
            assert (await call.ask("Second?")).text == agent.fallback_message
    _, saved, failed = (await read_call(database, "failing"))["turns"]
    [model] = saved["models"]
    assert (model["provider"], model["model"], model["outcome"]) == ("openai", "backup-model", "ok")
    [failover] = model["failovers"]
    assert failover.startswith("openai/gpt-4o-mini: ")
    assert saved["outcome"] == "completed" and saved["error"] is None
    assert failed["outcome"] == "fallback"
    assert failed["spoken"] == agent.fallback_message
    assert failed["error"].startswith("model failed")
