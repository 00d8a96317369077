"""``callbrain calls`` as a user runs it (a real process) on the database a real
server wrote, SQLite and PostgreSQL; and the flight recorder's promise end to
end: a recorded call, exported, replays with ``callbrain test``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from records_support import booking_call, booking_replies, clinic_agent, read_call, read_list
from typer.testing import CliRunner

from callbrain.agent import Agent
from callbrain.cli import app
from callbrain.examples import clinic_tools
from callbrain.records.settings import RecordsSettings
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.fake_llm import FakeOpenAIServer
from callbrain.testing.scenario import load_scenario


@pytest.fixture(autouse=True)
def _empty_calendar() -> Iterator[None]:
    clinic_tools._booked.clear()
    yield
    clinic_tools._booked.clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "calls.db")
    return str(request.getfixturevalue("postgres_url"))


async def callbrain(*args: str) -> tuple[int, str, str]:
    """Run ``callbrain ARGS``; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "160"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def record_booking_call(database: str, call_id: str) -> None:
    async with (
        FakeOpenAIServer(*booking_replies()) as fake,
        serve_agent(clinic_agent(fake, RecordsSettings(url=database))) as url,
    ):
        await booking_call(url, call_id)


async def test_list_show_and_export_read_what_the_server_wrote(database: str) -> None:
    await record_booking_call(database, "cli-call")

    code, out, _ = await callbrain("calls", "list", "--db", database, "--json")
    assert code == 0
    [listed] = orjson.loads(out)
    assert (listed["call_id"], listed["agent"], listed["turns"], listed["end"]) == (
        "cli-call",
        "records-clinic",
        3,
        "hangup",
    )
    assert listed["worst_first_frame_ms"] >= 0 and listed["duration_s"] > 0

    code, out, _ = await callbrain("calls", "show", "cli-call", "--db", database, "--json")
    assert code == 0
    shown = orjson.loads(out)
    assert shown == await read_call(database, "cli-call")
    assert [t["outcome"] for t in shown["turns"]][1] == "superseded"
    for turn in shown["turns"]:
        assert set(turn["timings_ms"]) == {"llm_request", "first_token", "first_frame", "complete"}

    code, out, _ = await callbrain("calls", "export", "cli-call", "--db", database)
    assert code == 0
    scenario = yaml.safe_load(out)
    assert [s.get("interrupts") for s in scenario["steps"]][1] is not None
    assert scenario["steps"][1]["expect"]["tools"][0]["name"] == "book_appointment"


async def test_the_human_views_show_the_turns_and_their_waterfall(tmp_path: Path) -> None:
    database = str(tmp_path / "calls.db")
    await record_booking_call(database, "human-call")

    code, out, _ = await callbrain("calls", "list", "--db", database)
    assert code == 0
    assert "human-call" in out and "records-clinic" in out and "hangup" in out

    code, out, _ = await callbrain("calls", "show", "human-call", "--db", database)
    assert code == 0
    assert "superseded" in out and "✂ cut off here" in out
    assert "Anything on Tuesday?" in out
    assert 'book_appointment({"patient_name":"Sam Lee","day":"tuesday","time":"10:30"}) ok' in out
    assert "a repeat: its stored result" in out
    assert "12 in / 7 out tokens" in out
    assert "█" in out and "░" in out  # the waterfall


async def test_the_database_comes_from_the_agent_file(tmp_path: Path) -> None:
    database = str(tmp_path / "from-file.db")
    await record_booking_call(database, "file-call")
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(
        "name: records-clinic\nllm: {provider: openai}\n"
        f"server:\n  records: {{url: {database}}}\n"
    )
    code, out, _ = await callbrain("calls", "list", "--agent", str(agent_file), "--json")
    assert code == 0 and [c["call_id"] for c in orjson.loads(out)] == ["file-call"]
    # An agent name (not a file) only filters.
    code, out, _ = await callbrain("calls", "list", "--agent", "someone-else", "--db", database)
    assert code == 0 and "no calls recorded for agent 'someone-else'" in out + _
    code, out, _ = await callbrain("calls", "show", "file-call", "--agent", str(agent_file))
    assert code == 0 and "file-call" in out


def test_what_is_missing_is_said_plainly(tmp_path: Path) -> None:
    """Each mistake in one process (the same command, without a process each)."""

    def calls(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["calls", *args])
        return result.exit_code, result.output + result.stderr

    nowhere = str(tmp_path / "nothing.db")
    code, said = calls("list", "--db", nowhere)
    assert code == 2 and "no call records at" in said
    code, said = calls("show", "x", "--db", "mysql://h/db")
    assert code == 2 and "unsupported database 'mysql'" in said
    off = tmp_path / "off.yaml"
    off.write_text("name: quiet\nllm: {provider: openai}\nserver: {records: false}\n")
    code, said = calls("export", "x", "--agent", str(off))
    assert code == 2 and "call records are off" in said
    code, said = calls("list", "--db", nowhere, "--agent", str(off))
    assert code == 2 and "give --db or --agent, not both" in said

    code, said = calls("migrate", "--db", nowhere)
    assert code == 0 and "up to date" in said
    code, said = calls("list", "--db", nowhere)
    assert code == 0 and "no calls recorded" in said
    code, said = calls("show", "missing-call", "--db", nowhere)
    assert code == 1 and "no call 'missing-call'" in said


async def test_an_exported_call_replays_with_callbrain_test(tmp_path: Path) -> None:
    """Serve an agent file, call it (a tool, a barge-in, a repeat), export the
    call, and replay it with `callbrain test` against the same file."""
    database = tmp_path / "calls.db"
    async with FakeOpenAIServer(*booking_replies()) as fake:
        agent_file = tmp_path / "clinic.yaml"
        agent_file.write_text(
            yaml.safe_dump(
                {
                    "name": "replayed-clinic",
                    "begin_message": "Hi {{first_name}}, Sunrise Clinic.",
                    "dynamic_variables": {"first_name": "Sam"},
                    "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
                    "tools": [
                        {"type": "python", "function": f"callbrain.examples.clinic_tools:{name}"}
                        for name in ("check_availability", "book_appointment")
                    ],
                    "server": {"records": {"url": str(database)}},
                }
            )
        )
        async with serve_agent(Agent.from_yaml(agent_file)) as url:
            await booking_call(url, "original-call")

    code, exported, err = await callbrain("calls", "export", "original-call", "-a", str(agent_file))
    assert code == 0, err
    scenario_file = tmp_path / "replay.yaml"
    scenario_file.write_text(exported)
    scenario = load_scenario(scenario_file)
    assert [getattr(s, "caller", None) for s in scenario.steps] == [
        "Anything on Tuesday?",
        "Ten thirty please, I'm Sam Lee.",
        "Can you book that again?",
    ]

    code, report, err = await callbrain(
        "test", str(scenario_file), "--agent", str(agent_file), "--json", "-"
    )
    assert code == 0, report + err
    [result] = orjson.loads(report[report.index("{") : report.rindex("}") + 1])["scenarios"]
    assert result["passed"], result

    # The replay was recorded too: the same turns, cut and booked as the original.
    [replay] = [c for c in await read_list(str(database)) if c["call_id"] != "original-call"]
    original = await read_call(str(database), "original-call")
    replayed = await read_call(str(database), replay["call_id"])
    assert [t["outcome"] for t in replayed["turns"]] == [t["outcome"] for t in original["turns"]]
    assert [[(x["name"], x["arguments"]) for x in t["tools"]] for t in replayed["turns"]] == [
        [(x["name"], x["arguments"]) for x in t["tools"]] for t in original["turns"]
    ]
