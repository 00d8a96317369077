"""Scenario files and ``callbrain test``: run against callbrain and against a
server that breaks the protocol, through the library and through the command."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
from misbehaving_server import app as misbehaving_app

from callbrain.agent import Agent, example_agent_path
from callbrain.examples import clinic_tools
from callbrain.llm.config import OpenAIConfig
from callbrain.testing import FakeOpenAIServer, Reply, RetellClient, serve_agent, serve_asgi
from callbrain.testing.scenario import (
    Scenario,
    ScenarioError,
    example_scenarios_path,
    find_scenarios,
    load_scenario,
)
from callbrain.testing.scenario_run import ScenarioResult, ScenarioRunner, judge
from callbrain.testing.suite import report_json, run_scenario, run_suite

EXAMPLES = example_scenarios_path()


@pytest.fixture(autouse=True)
def _empty_calendar() -> Iterator[None]:
    clinic_tools._booked.clear()
    yield
    clinic_tools._booked.clear()


@pytest_asyncio.fixture
async def misbehaving_url() -> AsyncIterator[str]:
    async with serve_asgi(misbehaving_app) as http:
        yield "ws" + http.removeprefix("http") + "/llm-websocket"


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def test_the_shipped_scripted_scenarios_pass_on_the_example_agent() -> None:
    files = [EXAMPLES / "book_appointment.yaml", EXAMPLES / "transfer.yaml"]
    results = await run_suite(files, agent=Agent.from_yaml(example_agent_path()))
    for result in results:
        assert result.passed, (result.name, result.violations, result.failures)
    booking, transfer = results
    # The tools really ran: the booking is in the clinic's calendar, once.
    assert clinic_tools._booked == {("tuesday", "10:30"): "Sam Lee"}
    assert [t.kind for t in booking.turns] == ["greeting", "caller", "caller", "caller"]
    assert all(t.first_chunk_ms is not None and t.complete_ms is not None for t in booking.turns)
    assert "the agent hung up" in booking.notes
    assert "the agent transferred to +14155550123" in transfer.notes
    report = report_json(results)
    assert report["passed"] is True
    first = report["scenarios"][0]
    assert first["name"] == "books an appointment, then hangs up"
    assert set(first["first_chunk_ms"]) == {"p50", "max"}
    assert first["first_sentence_ms"]["p50"] is not None


async def test_unmet_expectations_are_each_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: wrong on purpose
steps:
  - caller: Book me in for Monday at nine, please. I'm Bo.
    expect:
      said: [banana]
      tools: [{name: book_appointment, arguments: {day: friday}}]
expect:
  not_said: [booked]
  not_tools: [check_availability]
  action: transfer
script:
  - tool_calls: [{name: check_availability, arguments: {day: monday}}]
  - tool_calls:
      - {name: book_appointment, arguments: {patient_name: Bo, day: monday, time: "09:00"}}
  - text: You're booked on Monday at nine. Goodbye!
    tool_calls: [{name: end_call}]
""",
    )
    [result] = await run_suite([path], agent=Agent.from_yaml(example_agent_path()))
    assert not result.passed and result.violations == []
    failures = "\n".join(result.failures)
    assert "steps[0]: never said 'banana'" in failures
    assert "steps[0]: no call of book_appointment with {'day': 'friday'}" in failures
    assert 'book_appointment({"patient_name":"Bo","day":"monday","time":"09:00"})' in failures
    assert "call: said 'booked'" in failures
    assert "call: called check_availability, which it must not" in failures
    assert "call: expected transfer, it never happened" in failures
    assert len(result.failures) == 5


async def test_reply_expectations_catch_a_cut_reply_and_a_repeat(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: repeats itself
greeting:
  ends_sentence: true
steps:
  - caller: When are you open?
    expect: {ends_sentence: true}
  - caller: Where are you?
    expect: {ends_sentence: true, differs_from_previous: true}
  - caller: And where is that?
    expect: {differs_from_previous: true}
  - silence_ms: 10
    expect: {differs_from_previous: true, ends_sentence: true}
expect:
  ends_sentence: true
  distinct_replies: true
script:
  - text: We open at nine.
  - text: We are at 12 Harbour Road, and we are not available on
  - text: "We are at 12 harbour road,   and we are NOT available on"
  - text: Are you still there?
""",
    )
    [result] = await run_suite([path], agent=Agent.from_yaml(example_agent_path()))
    script = [reply.text for reply in load_scenario(path).script or []]
    assert result.violations == []
    cut, again = "We are at 12 Harbour Road, and we are not available on", script[2]
    assert sorted(result.failures) == [
        f"call: steps[1]: stopped mid-sentence (...{cut!r})",
        f"call: steps[2]: said the same as steps[1] ({again!r})",
        f"call: steps[2]: stopped mid-sentence (...{again!r})",
        f"steps[1]: stopped mid-sentence (...{cut!r})",
        f"steps[2]: said its previous reply again ({again!r})",
    ]


def test_reply_comparisons_are_refused_where_they_mean_nothing(tmp_path: Path) -> None:
    for where, problem in [
        ("greeting: {differs_from_previous: true}", "the greeting has no previous reply"),
        ("greeting: {distinct_replies: true}", "greeting.distinct_replies: only for the whole"),
        ("expect: {differs_from_previous: true}", "expect.differs_from_previous: only under a"),
        (
            "steps: [{caller: Hi, expect: {distinct_replies: true}}]",
            r"steps\[0\].expect.distinct_replies: only for the whole call",
        ),
    ]:
        with pytest.raises(ScenarioError, match=problem):
            load_scenario(write(tmp_path, where + "\n"))
    with pytest.raises(ScenarioError, match="ends_sentence: Input should be a valid boolean"):
        load_scenario(write(tmp_path, "expect: {ends_sentence: maybe}\n"))


async def test_a_barge_in_carries_the_partial_reply_and_leaves_no_stale_frame() -> None:
    scenario = Scenario.model_validate(
        {
            "steps": [
                {"caller": "Tell me about the clinic."},
                {"caller": "Just the address.", "interrupts": "first_chunk"},
                {"silence_ms": 50},
            ]
        }
    )
    slow = Reply("We are a family clinic with six doctors and a pharmacy.", chunk_delay=0.1)
    async with FakeOpenAIServer(slow, Reply("Twelve Harbour Road."), Reply("Still there?")) as fake:
        llm = OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k")
        agent = Agent(name="t", begin_message="Hello!", llm=llm)
        async with serve_agent(agent) as url:
            result = await run_scenario(scenario, url)
        assert result.passed, (result.violations, result.failures)
        assert [(t.kind, t.interrupted) for t in result.turns] == [
            ("greeting", False),
            ("caller", True),
            ("caller", False),
            ("reminder", False),
        ]
        await fake.wait_for_outcome(0, "client_disconnected")
        messages = fake.requests[1].body["messages"]
        # Retell's transcript keeps what the agent said before the caller cut in.
        assert messages[-2]["role"] == "assistant"
        assert messages[-2]["content"].startswith("We")
        assert messages[-1] == {"role": "user", "content": "Just the address."}


async def test_the_caller_speaks_in_growing_updates_then_asks(misbehaving_url: str) -> None:
    scenario = Scenario.model_validate(
        {"steps": [{"caller": "one two three four five six", "speak_ms": 40}]}
    )
    async with RetellClient.connect(misbehaving_url, "good") as call:
        result = ScenarioResult("updates", "")
        runner = ScenarioRunner(scenario, call)
        await runner.run(result)
        judge(runner, result)
    assert result.passed, (result.violations, result.failures)
    kinds = [f["interaction_type"] for f in call.sent if f["interaction_type"] != "ping_pong"]
    assert kinds == ["update_only"] * 4 + ["response_required"]
    updates = [f for f in call.sent if f["interaction_type"] == "update_only"]
    said = [u["transcript"][-1]["content"] for u in updates]
    assert said[-1] == "one two three four five six" and len(said) == 4
    assert all(len(a) < len(b) for a, b in itertools.pairwise(said))
    assert [u["turntaking"] for u in updates] == ["user_turn"] * 3 + ["agent_turn"]


async def test_callbrain_test_fails_a_server_that_breaks_the_protocol(
    tmp_path: Path, misbehaving_url: str
) -> None:
    write(tmp_path, "call: {call_id: good}\nsteps: [{caller: Hi}]\n", "a_good.yaml")
    write(
        tmp_path,
        "call: {call_id: stale_frame}\nsteps:\n"
        "  - caller: When do you close?\n"
        '  - {caller: "Sorry, today?", interrupts: first_chunk}\n',
        "b_stale.yaml",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        "test",
        str(tmp_path),
        "--url",
        misbehaving_url,
        "--json",
        str(tmp_path / "report.json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode()
    assert proc.returncode == 1, text
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    good, stale = report["scenarios"]
    assert good["passed"] is True and good["violations"] == []
    assert stale["passed"] is False
    assert any(v.startswith("stale_frame (response 1)") for v in stale["violations"])
    assert "1 passed, 1 failed" in text and "stale_frame" in text


async def test_a_bad_scenario_file_is_a_clear_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, "steps:\n  - caller: Hi\n    expect: {sayd: [hello]}\n")
    with pytest.raises(ScenarioError, match=r"scenario.yaml: .*sayd"):
        load_scenario(path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        "test",
        str(path),
        "--url",
        "ws://127.0.0.1:9",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "sayd" in output.decode() and "Traceback" not in output.decode()


def test_scenario_validation() -> None:
    with pytest.raises(ValueError, match="first step has no reply to interrupt"):
        Scenario.model_validate({"steps": [{"caller": "Hi", "interrupts": "first_chunk"}]})
    with pytest.raises(ScenarioError, match="no such file"):
        find_scenarios([Path("/nonexistent/scenarios")])
    shipped = find_scenarios([EXAMPLES])
    assert {p.name for p in shipped} >= {"book_appointment.yaml", "barge_in.yaml"}
    for path in shipped:
        assert load_scenario(path).steps


async def test_an_unreachable_server_fails_the_scenario_not_the_run() -> None:
    scenario = Scenario.model_validate({"name": "x", "steps": [{"caller": "Hi"}]})
    result = await run_scenario(scenario, "ws://127.0.0.1:9/llm-websocket")
    assert not result.passed
    assert result.failures[0].startswith("could not connect to ws://127.0.0.1:9")


async def test_callbrain_test_with_no_arguments_passes_on_the_shipped_agent(
    tmp_path: Path,
) -> None:
    # What a new user runs first: the shipped scenarios, on the shipped agent and
    # its embedded model, must pass (the scripted ones book and transfer for real).
    report_path = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        "test",
        "--json",
        str(report_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, output.decode()
    report = orjson.loads(report_path.read_bytes())
    names = {s["name"] for s in report["scenarios"]}
    assert {"caller barges in", "books an appointment, then hangs up"} <= names
    assert len(names) == len(find_scenarios([EXAMPLES]))
    # Among them five questions on the 135M model: different, whole-sentence
    # replies, and a check-in that is not the last answer again (the scenario's
    # own expectations), every turn completed.
    [five] = [s for s in report["scenarios"] if s["name"].startswith("answers five questions")]
    assert five["passed"]
    assert [t["kind"] for t in five["turns"]] == ["greeting", *["caller"] * 5, "reminder"]
    assert all(t["complete_ms"] is not None and not t["interrupted"] for t in five["turns"])


async def test_a_server_that_hangs_up_mid_scenario_fails_it_cleanly(misbehaving_url: str) -> None:
    scenario = Scenario.model_validate(
        {"call": {"call_id": "closes"}, "steps": [{"caller": "Hi"}, {"caller": "Hello?"}]}
    )
    result = await run_scenario(scenario, misbehaving_url)
    assert not result.passed
    assert any("closed the socket (code 1011)" in f for f in result.failures), result.failures
