"""The shipped clinic agent, end to end with tools, against both providers' wire formats."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import BACKENDS, RemoteBackend, in_module_loop

from callbrain.agent import Agent, example_agent_path
from callbrain.examples import clinic_tools
from callbrain.testing import FakeLLMServer, FakeToolCall, Reply, RetellClient, serve_agent

# One fake provider per module and backend (see conftest.py), reset for each test.
pytestmark = in_module_loop


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> RemoteBackend:
    return BACKENDS[request.param]


@pytest.fixture(autouse=True)
def empty_calendar() -> Iterator[None]:
    clinic_tools._booked.clear()
    yield
    clinic_tools._booked.clear()


def clinic_on(backend: RemoteBackend, fake: FakeLLMServer) -> Agent:
    llm = backend.config.model_validate(
        {"provider": backend.name, "base_url": fake.base_url, "api_key": "k", "max_retries": 0}
    )
    return Agent.from_yaml(example_agent_path()).model_copy(update={"llm": llm})


async def test_the_clinic_checks_books_once_and_hangs_up(
    backend: RemoteBackend, fake: FakeLLMServer
) -> None:
    booking = {"patient_name": "Ann Lee", "day": "friday", "time": "15:30", "reason": "checkup"}
    fake.script(
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "friday"})]),
        Reply("On Friday I have nine, half past ten, one, half past three or five."),
        Reply("", tool_calls=[FakeToolCall("book_appointment", booking)]),
        # The model repeats the booking: the stored result answers, nothing is booked twice.
        Reply("", tool_calls=[FakeToolCall("book_appointment", booking)]),
        Reply("You're booked for Friday at half past three."),
        Reply("Bye!", tool_calls=[FakeToolCall("end_call", {})]),
    )
    async with serve_agent(clinic_on(backend, fake)) as url, RetellClient.connect(url) as call:
        await call.expect_config()
        await call.send_call_details({"call_id": "test-call", "retell_llm_dynamic_variables": {}})
        assert "Sunrise Clinic" in (await call.expect_begin()).text
        turn = await call.ask("Is anything free on Friday?")
        assert turn.text.startswith("Let me check the calendar. On Friday")
        turn = await call.ask("Half three please, Ann Lee, for a checkup.")
        assert turn.text == "Let me book that for you. You're booked for Friday at half past three."
        assert clinic_tools._booked == {("friday", "15:30"): "Ann Lee"}
        results = [f for f in call.frames if f.get("response_type") == "tool_call_result"]
        assert [r["successful"] for r in results] == [True, True, True]
        assert results[1]["content"] == "Booked Ann Lee on Friday at 15:30 for checkup."
        last = (await call.ask("That's all, thanks.")).frames[-1]
        assert last["end_call"] is True and last["content_complete"] is True
        tools = fake.requests[0].body["tools"]
        names = {t.get("name") or t["function"]["name"] for t in tools}
        assert names == {"check_availability", "book_appointment", "transfer_call", "end_call"}


async def test_a_taken_slot_is_an_error_the_model_can_recover_from(
    backend: RemoteBackend, fake: FakeLLMServer
) -> None:
    clinic_tools._booked[("monday", "09:00")] = "Someone Else"
    fake.script(
        Reply(
            "",
            tool_calls=[
                FakeToolCall(
                    "book_appointment", {"patient_name": "Bo", "day": "monday", "time": "09:00"}
                )
            ],
        ),
        Reply("Sorry, nine is gone. How about half past ten?"),
    )
    async with serve_agent(clinic_on(backend, fake)) as url, RetellClient.connect(url) as call:
        await call.expect_config()
        await call.expect_begin()
        turn = await call.ask("Monday at nine, I'm Bo.")
        assert turn.text.endswith("How about half past ten?")
        [result] = [f for f in call.frames if f.get("response_type") == "tool_call_result"]
        assert result["successful"] is False and "just taken" in result["content"]
        assert clinic_tools._booked == {("monday", "09:00"): "Someone Else"}
