"""A dropped socket and Retell's reconnect: the call goes on where it was.

Run against the in-memory store and against a real ``redis-server`` that the
tests start themselves (two app instances sharing it stand for two servers
behind a load balancer). Without the binary the Redis tests skip and say why;
CI installs it and sets ``CALLBRAIN_REQUIRE_REDIS=1``, which turns that skip
into a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from support import agent_on

from callbrain.agent import Agent
from callbrain.call.control import CallControl
from callbrain.server.app import create_app
from callbrain.testing import FakeOpenAIServer, FakeToolCall, Reply, RetellClient, serve_asgi
from callbrain.testing.serve import free_port
from callbrain.tools import tool

BOOKINGS: list[str] = []


@tool(side_effects=True)
def book(day: str) -> str:
    """Book an appointment.

    Args:
        day: The day.
    """
    BOOKINGS.append(day)
    return f"Booked for {day}, reference R{len(BOOKINGS)}."


@pytest.fixture(autouse=True)
def _no_bookings() -> Iterator[None]:
    BOOKINGS.clear()
    yield
    BOOKINGS.clear()


def make_agent(fake: FakeOpenAIServer, redis: str | None = None, **fields: Any) -> Agent:
    server = {"store": {"redis_url": redis}} if redis else {}
    defaults = {"begin_message": "Hi, Sunrise Clinic.", "tools": [book], "holding_messages": []}
    return agent_on(fake, server=server, **{**defaults, **fields})


def ws_url(http: str) -> str:
    return "ws" + http.removeprefix("http") + "/llm-websocket"


async def book_then_reconnect(first_url: str, second_url: str, fake: FakeOpenAIServer) -> None:
    """Book on one socket; drop it; on a new socket the model asks to book again."""
    fake.script(
        Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})]),
        Reply("You're booked for Tuesday."),
        # After the reconnect the model, unsure, calls the booking again.
        Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})]),
        Reply("Yes, Tuesday is booked."),
    )
    async with RetellClient.connect(first_url, "call-1") as call:
        await call.expect_config()
        await call.send_call_details(
            {"call_id": "call-1", "retell_llm_dynamic_variables": {"n": "Sam"}}
        )
        await call.expect_begin()
        turn = await call.ask("Book me for Tuesday.")
        assert turn.text == "You're booked for Tuesday."
        transcript = list(call.transcript)
    # The socket is gone; Retell reconnects with the same call id and transcript.
    async with RetellClient.connect(second_url, "call-1") as call:
        call.transcript = transcript
        await call.expect_config()
        greeting = await call.expect_begin()
        assert greeting.text == ""  # mid-call: no second "Hi, Sunrise Clinic."
        turn = await call.ask("Did that go through?")
        assert turn.text == "Yes, Tuesday is booked." and turn.completes == 1
        assert call.checker.finish(asyncio.get_running_loop().time()) == []
    assert BOOKINGS == ["tuesday"]  # the repeat got the stored result
    # The model after the reconnect saw the first booking, restored from the store.
    after = fake.requests[2].body["messages"]
    assert any(m.get("tool_calls") for m in after if m["role"] == "assistant")
    assert any(m["role"] == "tool" and "reference R1" in m["content"] for m in after)


async def test_a_reconnect_to_the_same_instance_goes_on_where_the_call_was() -> None:
    async with FakeOpenAIServer() as fake, serve_asgi(create_app(make_agent(fake))) as http:
        await book_then_reconnect(ws_url(http), ws_url(http), fake)


async def test_a_reconnect_to_another_instance_finds_the_call_in_redis(redis_url: str) -> None:
    async with (
        FakeOpenAIServer() as fake,
        serve_asgi(create_app(make_agent(fake, redis_url))) as first,
        serve_asgi(create_app(make_agent(fake, redis_url))) as second,
    ):
        await book_then_reconnect(ws_url(first), ws_url(second), fake)


async def test_without_a_shared_store_another_instance_starts_afresh() -> None:
    # The control experiment: two instances with memory stores share nothing.
    async with (
        FakeOpenAIServer() as fake,
        serve_asgi(create_app(make_agent(fake))) as first,
        serve_asgi(create_app(make_agent(fake))) as second,
    ):
        fake.script(
            Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})]),
            Reply("Booked."),
            Reply("", tool_calls=[FakeToolCall("book", {"day": "tuesday"})]),
            Reply("Booked again."),
        )
        for url in (ws_url(first), ws_url(second)):
            async with RetellClient.connect(url, "call-1") as call:
                await call.expect_config()
                greeting = await call.expect_begin()
                await call.ask("Book me for Tuesday.")
        assert greeting.text == "Hi, Sunrise Clinic."  # it did not know the call
    assert BOOKINGS == ["tuesday", "tuesday"]


async def test_interrupt_ids_and_call_details_survive_a_reconnect(redis_url: str) -> None:
    seen: list[dict[str, str]] = []

    async def greet(control: CallControl) -> None:
        seen.append(dict(control.variables))
        await control.interrupt("Quick note.")

    async with FakeOpenAIServer(default=Reply("OK.")) as fake:
        agent = make_agent(fake, redis_url)
        async with serve_asgi(create_app(agent, on_call_start=greet)) as http:
            ids = []
            for attempt in range(2):
                async with RetellClient.connect(ws_url(http), "call-9") as call:
                    await call.expect_config()
                    if attempt == 0:
                        await call.send_call_details(
                            {"call_id": "call-9", "retell_llm_dynamic_variables": {"name": "Ann"}}
                        )
                    await call.wait_for(
                        lambda f: any(x["response_type"] == "agent_interrupt" for x in f)
                    )
                    ids += [f["interrupt_id"] for f in call.frames if "interrupt_id" in f]
    assert ids == [1, 2]  # a new socket does not reuse interrupt id 1
    assert seen[1]["name"] == "Ann"  # the call details came back from the store


async def test_an_unreachable_redis_fails_the_start_up() -> None:
    async with FakeOpenAIServer() as fake:
        app = create_app(make_agent(fake, f"redis://127.0.0.1:{free_port()}/0"))
        with pytest.raises(RuntimeError, match="failed to start"):
            async with serve_asgi(app):
                pass


class Gate:
    """A side-effecting tool that holds its booking until the test lets it go."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.started_again = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0


GATE = Gate()


@tool(side_effects=True)
async def book_slowly(day: str) -> str:
    """Book an appointment (slowly).

    Args:
        day: The day.
    """
    GATE.runs += 1
    (GATE.started if GATE.runs == 1 else GATE.started_again).set()
    await GATE.release.wait()
    BOOKINGS.append(day)
    return f"Booked for {day}, reference R{len(BOOKINGS)}."


class LogEvent(logging.Handler):
    """Sets an event when a log line with ``text`` is emitted (no polling the log)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_a_reconnect_to_another_instance_waits_for_the_booking_still_running(
    redis_url: str,
) -> None:
    global GATE
    GATE = Gate()
    waiting = LogEvent("the same run is in progress elsewhere")
    tools_log = logging.getLogger("callbrain.tools")
    tools_log.addHandler(waiting)
    level = tools_log.level
    tools_log.setLevel(logging.INFO)
    try:
        await reconnect_during_a_booking(redis_url, waiting)
    finally:
        tools_log.removeHandler(waiting)
        tools_log.setLevel(level)
    assert BOOKINGS == ["tuesday"] and GATE.runs == 1


async def reconnect_during_a_booking(redis_url: str, waiting: LogEvent) -> None:
    async with FakeOpenAIServer() as fake:
        agent = make_agent(fake, redis_url, tools=[book_slowly])
        fake.script(
            Reply("", tool_calls=[FakeToolCall("book_slowly", {"day": "tuesday"})]),
            # On the new instance the model, unsure, asks for the same booking.
            Reply("", tool_calls=[FakeToolCall("book_slowly", {"day": "tuesday"})]),
            Reply("You're booked for Tuesday."),
        )
        async with (
            serve_asgi(create_app(agent)) as first,
            serve_asgi(create_app(agent)) as second,
        ):
            async with RetellClient.connect(ws_url(first), "call-7") as call:
                await call.expect_config()
                await call.expect_begin()
                await call.say("Book me for Tuesday.")
                await GATE.started.wait()
            # The socket dropped mid-booking; Retell reconnects to the other instance.
            async with RetellClient.connect(ws_url(second), "call-7") as call:
                await call.expect_config()
                await call.expect_begin()
                rid = await call.say("Hello? Did it work?")
                # Either the second instance waits for the first one's run (right),
                # or it starts a second booking (the bug the run lock prevents).
                outcome = asyncio.ensure_future(
                    asyncio.wait(
                        [
                            asyncio.ensure_future(waiting.seen.wait()),
                            asyncio.ensure_future(GATE.started_again.wait()),
                        ],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                )
                await asyncio.wait_for(outcome, 10)
                assert not GATE.started_again.is_set(), "booked twice across instances"
                GATE.release.set()  # only now does the first instance's booking finish
                turn = await call.response(rid)
                assert turn.text == "You're booked for Tuesday." and turn.completes == 1
                results = [f for f in call.frames if f["response_type"] == "tool_call_result"]
                assert [r["successful"] for r in results] == [True]
                assert "reference R1" in results[0]["content"]
                assert "was not repeated" in results[0]["content"]
