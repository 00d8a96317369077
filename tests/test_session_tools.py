"""Tools and call control over a real socket, against both providers' wire formats.

Each test runs the whole path: Retell frames in, the session, the real OpenAI or
Anthropic SDK streaming tool calls from a fake provider on loopback, the tools
themselves, and frames back out. Slow tools are held on events the test
releases, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from support import BACKENDS, RemoteBackend, in_module_loop, llm_config

from callbrain.agent import Agent, RetellConfig
from callbrain.call.control import CallControl
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeLLMServer, FakeToolCall, Reply
from callbrain.tools import Tool, ToolContext, ToolError, tool

FALLBACK = "Sorry, could you say that again?"
FILLER = "Still working on it."


# One fake provider per module and backend (see conftest.py), reset for each test.
pytestmark = in_module_loop


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> RemoteBackend:
    return BACKENDS[request.param]


@dataclass
class Clinic:
    """The world the test tools act on, and the events that hold slow tools."""

    bookings: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[str] = field(default_factory=list)

    def tools(self) -> list[Tool]:
        @tool
        def check_availability(day: str) -> dict[str, Any]:
            """Free appointment times on a day.

            Args:
                day: The day, e.g. "friday".
            """
            self.seen.append(day)
            return {"day": day, "free": ["09:00", "15:30"]}

        @tool(side_effects=True, holding_message="Let me book that.")
        async def book_appointment(name: str, day: str, time: str) -> str:
            """Book an appointment."""
            self.started.set()
            await self.release.wait()
            self.bookings.append({"name": name, "day": day, "time": time})
            return f"Booked {name} on {day} at {time}."

        @tool
        async def wait_for_partner() -> str:
            """Returns once `partner` has run: proves the two run at the same time."""
            self.started.set()
            await self.release.wait()
            return "together"

        @tool
        async def partner() -> str:
            """Releases `wait_for_partner`."""
            await self.started.wait()
            self.release.set()
            return "released"

        @tool
        def cancel_appointment(day: str) -> str:
            """Cancel an appointment."""
            raise ToolError(f"There is no appointment on {day}.")

        @tool
        def broken() -> str:
            """Always crashes."""
            raise RuntimeError("database password is hunter2")

        @tool(timeout_s=0.2)
        async def hangs() -> str:
            """Never returns."""
            await asyncio.Event().wait()
            return "never"

        @tool(holding_message="")
        async def slow_lookup() -> str:
            """Waits for the test to release it."""
            self.started.set()
            await self.release.wait()
            return "found it"

        @tool(instant=True)
        def clock() -> str:
            """The time."""
            return "It is noon."

        @tool(instant=True)
        async def announce_later(context: ToolContext) -> str:
            """Speaks up when a background job finishes."""

            async def later() -> None:
                await self.release.wait()
                await context.call.interrupt("Your results are ready.")

            asyncio.get_running_loop().create_task(later())
            return "I'll let them know when it's ready."

        @tool(instant=True)
        async def tune(context: ToolContext) -> str:
            """Slows the agent down and tells the web frontend."""
            await context.call.update_agent(responsiveness=0.5, reminder_max_count=2)
            await context.call.send_metadata({"screen": "booking"})
            context.no_interruption()
            return "ok"

        return [
            check_availability,
            book_appointment,
            wait_for_partner,
            partner,
            cancel_appointment,
            broken,
            hangs,
            slow_lookup,
            clock,
            announce_later,
            tune,
        ]


@pytest.fixture
def clinic() -> Clinic:
    return Clinic()


def make_agent(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic, **overrides: Any
) -> Agent:
    llm = llm_config(fake, model="test-model")
    fields: dict[str, Any] = {
        "name": "test",
        "system_prompt": "You are a clinic receptionist.",
        "begin_message": "Hello!",
        "fallback_message": FALLBACK,
        "holding_messages": ["One moment."],
        "tool_filler_message": FILLER,
        "tool_filler_after_s": None,
        "llm": llm,
        "tools": [
            *clinic.tools(),
            {"type": "end_call", "message": "Goodbye!"},
            {"type": "transfer_call", "number": "+14155550100"},
            {"type": "press_digit"},
        ],
    }
    fields.update(overrides)
    return Agent(**fields)


@contextlib.asynccontextmanager
async def call_with(agent: Agent, **options: Any) -> AsyncIterator[RetellClient]:
    async with serve_agent(agent, **options) as url, RetellClient.connect(url, "call-1") as call:
        await call.expect_config()
        await call.expect_begin()
        yield call


def calls(*specs: tuple[str, dict[str, Any] | str]) -> list[FakeToolCall]:
    return [FakeToolCall(name, arguments) for name, arguments in specs]


def of_type(call: RetellClient, kind: str) -> list[dict[str, Any]]:
    return [f for f in call.frames if f.get("response_type") == kind]


def results_in_call_order(call: RetellClient) -> list[dict[str, Any]]:
    """``tool_call_result`` frames in the order of their invocations (they are sent
    as each tool finishes)."""
    results = {f["tool_call_id"]: f for f in of_type(call, "tool_call_result")}
    return [results[f["tool_call_id"]] for f in of_type(call, "tool_call_invocation")]


def tool_outputs(body: dict[str, Any]) -> list[str]:
    """The tool results the provider was sent, in either wire format."""
    found = []
    for message in body["messages"]:
        if message["role"] == "tool":
            found.append(message["content"])
        elif isinstance(message.get("content"), list):
            found += [
                block["content"]
                for block in message["content"]
                if block.get("type") == "tool_result"
            ]
    return found


# ------------------------------------------------------------------ tool calls


async def test_a_tool_call_is_announced_run_reported_and_answered(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(
        Reply("", tool_calls=calls(("check_availability", {"day": "friday"}))),
        Reply("Friday at nine or half past three."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Anything on Friday?")
        assert turn.text == "One moment. Friday at nine or half past three."
        assert turn.completes == 1
        [invocation] = of_type(call, "tool_call_invocation")
        [result] = of_type(call, "tool_call_result")
        assert invocation["name"] == "check_availability"
        assert json.loads(invocation["arguments"]) == {"day": "friday"}
        assert result["tool_call_id"] == invocation["tool_call_id"]
        assert result["successful"] is True
        assert json.loads(result["content"]) == {"day": "friday", "free": ["09:00", "15:30"]}
        first, second = fake.requests
        assert [t.get("name") or t["function"]["name"] for t in first.body["tools"]][:2] == [
            "check_availability",
            "book_appointment",
        ]
        assert tool_outputs(second.body) == [result["content"]]


async def test_parallel_calls_run_together_and_both_results_go_back(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    # wait_for_partner only returns once partner has run: run one after the
    # other, the turn would hang and the test time out.
    fake.script(
        Reply("Checking both.", tool_calls=calls(("wait_for_partner", {}), ("partner", {}))),
        Reply("All set."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Do both.")
        assert turn.text == "Checking both. All set."  # it spoke first: no holding line
        assert [f["content"] for f in of_type(call, "tool_call_result")] in (
            ["together", "released"],
            ["released", "together"],
        )
        assert tool_outputs(fake.requests[1].body) == ["together", "released"]


async def test_several_steps_in_one_turn(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    clinic.release.set()
    fake.script(
        Reply("", tool_calls=calls(("check_availability", {"day": "monday"}))),
        Reply(
            "",
            tool_calls=calls(
                ("book_appointment", {"name": "Ann", "day": "monday", "time": "09:00"})
            ),
        ),
        Reply("You're booked for Monday at nine."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Book me Monday morning, I'm Ann.")
        assert turn.text == "One moment. You're booked for Monday at nine."
        assert clinic.bookings == [{"name": "Ann", "day": "monday", "time": "09:00"}]
        assert len(tool_outputs(fake.requests[2].body)) == 2
        assert len({f["response_id"] for f in of_type(call, "response")} - {0}) == 1


async def test_malformed_and_invalid_arguments_become_results_the_model_sees(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(
        Reply(
            "",
            tool_calls=calls(
                ("check_availability", "{'day': 'friday',}"),  # near-JSON: repaired
                ("check_availability", '{"weekday": 5}'),  # wrong schema
                ("no_such_tool", {}),
            ),
        ),
        Reply("Let me try that again."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Friday?")
        assert turn.text.endswith("Let me try that again.") and turn.completes == 1
        repaired, invalid, unknown = results_in_call_order(call)
        assert repaired["successful"] is True and clinic.seen == ["friday"]
        assert invalid["successful"] is False and "day" in invalid["content"]
        assert unknown["successful"] is False and "no_such_tool" in unknown["content"]
        assert len(tool_outputs(fake.requests[1].body)) == 3


async def test_a_failing_tool_reports_its_error_and_a_crash_hides_its_details(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(
        Reply("", tool_calls=calls(("cancel_appointment", {"day": "friday"}), ("broken", {}))),
        Reply("I couldn't find that appointment."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Cancel Friday.")
        assert turn.text == "One moment. I couldn't find that appointment."
        failed, crashed = results_in_call_order(call)
        assert failed["successful"] is False
        assert "no appointment on friday" in failed["content"]
        assert crashed["successful"] is False
        assert "hunter2" not in json.dumps(call.frames)
        assert "hunter2" not in json.dumps(fake.requests[1].body)


async def test_a_tool_that_times_out_is_reported_and_the_turn_goes_on(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("", tool_calls=calls(("hangs", {}))), Reply("That system is slow today."))
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Check it.")
        assert turn.text == "One moment. That system is slow today."
        [result] = of_type(call, "tool_call_result")
        assert result["successful"] is False and "did not finish" in result["content"]


async def test_a_slow_tool_gets_one_filler_and_no_holding_line_when_it_has_none(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("", tool_calls=calls(("slow_lookup", {}))), Reply("Here it is."))
    agent = make_agent(backend, fake, clinic, tool_filler_after_s=0.05)
    async with call_with(agent) as call:
        rid = await call.say("Look it up.")
        await call.wait_for(lambda _: FILLER in call.response_turn(rid).text)
        clinic.release.set()
        turn = await call.response(rid)
        assert turn.text == f"{FILLER} Here it is."


async def test_no_holding_line_for_instant_tools_or_when_switched_off(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    clinic.release.set()
    fake.script(
        Reply("", tool_calls=calls(("clock", {}))),
        Reply("It's noon."),
        Reply("", tool_calls=calls(("check_availability", {"day": "friday"}))),
        Reply("Friday is open."),
    )
    async with call_with(make_agent(backend, fake, clinic, holding_messages=[])) as call:
        assert (await call.ask("What time is it?")).text == "It's noon."
        assert (await call.ask("And Friday?")).text == "Friday is open."


async def test_too_many_tool_rounds_end_in_the_fallback_line(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.reset(default=Reply("", tool_calls=calls(("clock", {}))))
    async with call_with(make_agent(backend, fake, clinic, max_tool_steps=2)) as call:
        turn = await call.ask("Loop forever.")
        assert turn.text == FALLBACK and turn.completes == 1
        assert len(fake.requests) == 3
        assert len(of_type(call, "tool_call_result")) == 2  # the third round never ran


# ------------------------------------------------------ barge-in and idempotency


async def test_a_booking_interrupted_by_the_caller_runs_once_and_is_remembered(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    booking = {"name": "Ann", "day": "friday", "time": "15:30"}
    fake.script(
        Reply("", tool_calls=calls(("book_appointment", booking))),
        # The caller spoke again; the model books the same slot again.
        Reply("", tool_calls=calls(("book_appointment", booking))),
        Reply("You're booked for Friday at half past three."),
        Reply("You're welcome."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        first = await call.say("Book Friday 3:30, I'm Ann.")
        await asyncio.wait_for(clinic.started.wait(), 10)
        call.transcript[-1]["content"] += " Please."
        seen_before_newer = len(call.frames)
        second = await call.request()
        # The newer turn asks for the same booking while the first is still running.
        await call.wait_for(lambda _: len(of_type(call, "tool_call_invocation")) == 2)
        assert clinic.bookings == []
        clinic.release.set()
        turn = await call.response(second)
        assert turn.text == "Let me book that. You're booked for Friday at half past three."
        assert clinic.bookings == [booking]  # once, not twice
        stale = [f for f in call.frames[seen_before_newer:] if f.get("response_id") == first]
        assert stale == []
        assert not call.response_turn(first).complete
        results = of_type(call, "tool_call_result")
        assert len(results) == 2 and all(r["successful"] for r in results)
        assert "not repeated" in tool_outputs(fake.requests[2].body)[0]
        # The next turn's conversation carries the booking: the model knows it happened.
        call.transcript.append({"role": "user", "content": "Thanks!"})
        await call.response(await call.request())
        assert any("Booked Ann" in text for text in tool_outputs(fake.requests[3].body))


async def test_a_booking_in_flight_when_the_socket_drops_is_not_repeated_after_reconnect(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    booking = {"name": "Bo", "day": "monday", "time": "09:00"}
    fake.script(
        Reply("", tool_calls=calls(("book_appointment", booking))),
        Reply("", tool_calls=calls(("book_appointment", booking))),
        Reply("You're booked."),
    )
    async with serve_agent(make_agent(backend, fake, clinic)) as url:
        async with RetellClient.connect(url, "call-9") as first:
            await first.expect_config()
            await first.expect_begin()
            await first.say("Monday at nine, I'm Bo.")
            await asyncio.wait_for(clinic.started.wait(), 10)
        # Retell reconnects the same call on a new socket and asks again.
        async with RetellClient.connect(url, "call-9") as second:
            await second.expect_config()
            await second.expect_begin()
            rid = await second.say("Monday at nine, I'm Bo.")
            # The first booking is still running when the new socket asks again.
            await second.wait_for(lambda _: bool(of_type(second, "tool_call_invocation")))
            assert clinic.bookings == []
            clinic.release.set()
            turn = await second.response(rid)
            assert turn.text.endswith("You're booked.")
            [result] = of_type(second, "tool_call_result")
            assert result["successful"] is True and "not repeated" in result["content"]
    assert clinic.bookings == [booking]


# ---------------------------------------------------------------- call control


async def test_end_call_says_goodbye_on_the_frame_that_hangs_up(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("", tool_calls=calls(("end_call", {}))))
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("That's all, bye.")
        assert turn.frames == [
            {
                "response_type": "response",
                "response_id": turn.response_id,
                "content": "Goodbye!",
                "content_complete": True,
                "end_call": True,
            }
        ]
        assert len(fake.requests) == 1  # nothing more to ask the model


async def test_transfer_rides_on_spoken_content_and_cannot_be_interrupted(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("Sure.", tool_calls=calls(("transfer_call", {}))))
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Can I talk to a person?")
        last = turn.frames[-1]
        assert last["content"] == " Let me transfer you now."
        assert last["transfer_number"] == "+14155550100"
        assert last["no_interruption_allowed"] is True and last["content_complete"] is True
        assert "end_call" not in last and "digit_to_press" not in last


async def test_press_digit_and_end_call_in_one_message_end_call_wins(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(
        Reply(
            "",
            tool_calls=calls(("press_digit", {"digits": "1#"}), ("end_call", {"message": "Bye."})),
        )
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        last = (await call.ask("Press one then hang up.")).frames[-1]
        assert last["end_call"] is True and last["content"] == "Bye."
        assert "digit_to_press" not in last


async def test_press_digit_sends_the_digits(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(
        Reply("", tool_calls=calls(("press_digit", {"digits": "2"}))),
        Reply("", tool_calls=calls(("press_digit", {"digits": "12a"}))),
        Reply("That menu option does not exist."),
    )
    async with call_with(make_agent(backend, fake, clinic)) as call:
        last = (await call.ask("Press two.")).frames[-1]
        assert last["digit_to_press"] == "2" and last["content_complete"] is True
        turn = await call.ask("Now press 12a.")
        assert "digit_to_press" not in turn.frames[-1]  # invalid digits never reach Retell
        [_, invalid] = of_type(call, "tool_call_result")
        assert invalid["successful"] is False


async def test_a_background_job_speaks_up_with_agent_interrupt(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("", tool_calls=calls(("announce_later", {}))), Reply("I'll tell you."))
    async with call_with(make_agent(backend, fake, clinic)) as call:
        await call.ask("Tell me when my results are in.")
        clinic.release.set()
        await call.wait_for(lambda _: bool(of_type(call, "agent_interrupt")))
        assert of_type(call, "agent_interrupt") == [
            {
                "response_type": "agent_interrupt",
                "interrupt_id": 1,
                "content": "Your results are ready.",
                "content_complete": True,
                "no_interruption_allowed": True,
            }
        ]


async def test_update_agent_metadata_and_no_interruption_from_a_tool(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    fake.script(Reply("", tool_calls=calls(("tune", {}))), Reply("Take your time."))
    async with call_with(make_agent(backend, fake, clinic)) as call:
        turn = await call.ask("Give me a moment to find my card.")
        assert of_type(call, "update_agent") == [
            {
                "response_type": "update_agent",
                "agent_config": {"responsiveness": 0.5, "reminder_max_count": 2},
            }
        ]
        assert of_type(call, "metadata") == [
            {"response_type": "metadata", "metadata": {"screen": "booking"}}
        ]
        assert all(f["no_interruption_allowed"] is True for f in turn.frames)


async def test_application_code_controls_the_call_from_on_call_start(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    async def on_call_start(control: CallControl) -> None:
        await control.send_metadata({"call": control.call_id})
        await control.interrupt("Quick note before we start.", no_interruption_allowed=False)

    agent = make_agent(backend, fake, clinic)
    async with call_with(agent, on_call_start=on_call_start) as call:
        await call.wait_for(lambda _: bool(of_type(call, "agent_interrupt")))
        assert of_type(call, "metadata")[0]["metadata"] == {"call": "call-1"}
        assert "no_interruption_allowed" not in of_type(call, "agent_interrupt")[0]


# --------------------------------------------------- transcript_with_tool_calls


async def test_retells_woven_transcript_reaches_the_model(
    backend: RemoteBackend, fake: FakeLLMServer, clinic: Clinic
) -> None:
    flags = RetellConfig(transcript_with_tool_calls=True)
    fake.script(Reply("See you Friday."))
    async with call_with(make_agent(backend, fake, clinic, retell_config=flags)) as call:
        woven = [
            {"role": "user", "content": "Is Friday free?"},
            {
                "role": "tool_call_invocation",
                "tool_call_id": "t1",
                "name": "check_availability",
                "arguments": '{"day":"friday"}',
            },
            {
                "role": "tool_call_result",
                "tool_call_id": "t1",
                "content": "free at 9",
                "successful": True,
            },
            {"role": "agent", "content": "Friday at nine is free."},
            {"role": "user", "content": "Great."},
        ]
        await call.send(
            {
                "interaction_type": "response_required",
                "response_id": 1,
                "transcript": [w for w in woven if w["role"] in ("user", "agent")],
                "transcript_with_tool_calls": woven,
            }
        )
        await call.response(1)
        assert tool_outputs(fake.requests[0].body) == ["free at 9"]
