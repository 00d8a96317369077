"""Shared pieces for the call records tests: the agent, a scripted call, reading back."""

from __future__ import annotations

from typing import Any

from callbrain.agent import Agent
from callbrain.examples.clinic_tools import book_appointment, check_availability
from callbrain.llm.config import OpenAIConfig
from callbrain.records.database import open_engine
from callbrain.records.read import list_calls, load_call
from callbrain.records.settings import RecordsSettings, database_url
from callbrain.server.settings import ServerSettings
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply

FULL_ANSWER = "On Tuesday I have nine, ten thirty and one. Which suits you?"
BOOKING = {"patient_name": "Sam Lee", "day": "tuesday", "time": "10:30"}


def clinic_agent(fake: FakeOpenAIServer, records: RecordsSettings | bool) -> Agent:
    """Two clinic tools (one read-only, one with side effects) on the fake model."""
    return Agent(
        name="records-clinic",
        begin_message="Hi {{first_name}}, Sunrise Clinic.",
        dynamic_variables={"first_name": "Sam"},
        llm=OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k", max_retries=0),
        tools=[check_availability, book_appointment],
        server=ServerSettings(records=records),
        # The plain path: these tests time the model from the request's arrival
        # (a speculated answer starts before it; tests/test_speculation.py).
        speculation={"enabled": False},
    )


def booking_replies() -> list[Reply]:
    """What the fake model answers to :func:`booking_call`, in order."""
    return [
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "tuesday"})]),
        Reply(FULL_ANSWER, chunk_delay=0.3),  # slow: the caller cuts in
        Reply("", tool_calls=[FakeToolCall("book_appointment", BOOKING)]),
        Reply("You're booked, Sam."),
        Reply("", tool_calls=[FakeToolCall("book_appointment", BOOKING)]),  # a repeat
        Reply("Still booked. Bye!"),
    ]


async def booking_call(url: str, call_id: str) -> None:
    """A caller asks, barges in on the answer, books, and asks again (a repeat)."""
    async with RetellClient.connect(url, call_id) as call:
        await call.expect_config()
        await call.expect_begin()
        first = await call.say("Anything on Tuesday?")
        await call.wait_for(lambda _: "Tuesday" in call.response_turn(first).text)
        call.transcript.append({"role": "agent", "content": call.response_turn(first).text})
        booked = await call.ask("Ten thirty please, I'm Sam Lee.")
        assert "booked" in booked.text
        again = await call.ask("Can you book that again?")
        assert "Still booked" in again.text


async def read_call(url: str, call_id: str) -> dict[str, Any]:
    engine = open_engine(database_url(url), for_reading=True)
    try:
        async with engine.connect() as connection:
            found = await load_call(connection, call_id)
    finally:
        await engine.dispose()
    assert found is not None, f"no call {call_id} recorded"
    return found


async def read_list(url: str, **options: Any) -> list[dict[str, Any]]:
    engine = open_engine(database_url(url), for_reading=True)
    try:
        async with engine.connect() as connection:
            return await list_calls(connection, **options)
    finally:
        await engine.dispose()
