"""Speculative generation, driven frame by frame (no socket): an answer started
from ``update_only`` is used when Retell's request matches, dropped when it does
not, never for a reminder, and never runs a tool before the request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callbrain.agent import Agent
from callbrain.call.record import CallRecord, TurnRecord
from callbrain.call.speculation import looks_finished, normalized, signature
from callbrain.llm.chat import ChatRequest, Message
from callbrain.testing.harness import FakeTransport, ScriptedLLM, request, session, tool_call
from callbrain.tools import tool

QUESTION = "What time do you open on Saturday?"


def make_agent(**fields: Any) -> Agent:
    base: dict[str, Any] = {
        "name": "speculative",
        "begin_message": "Hi.",
        "holding_messages": [],
        "first_token_filler_after_s": None,
        "speculation": {"enabled": True},
    }
    return Agent(**{**base, **fields})


def update(*texts: str) -> dict[str, Any]:
    """An update_only whose transcript is the greeting and then the caller's ``texts``."""
    transcript = [{"role": "agent", "content": "Hi."}]
    transcript += [{"role": "user", "content": text} for text in texts]
    return {"interaction_type": "update_only", "transcript": transcript}


def asked(response_id: int, text: str) -> dict[str, Any]:
    return request(
        response_id,
        transcript=[{"role": "agent", "content": "Hi."}, {"role": "user", "content": text}],
    )


class Turns:
    """Keeps the turn records the session reports."""

    def __init__(self) -> None:
        self.ended: dict[int, TurnRecord] = {}

    def call_started(self, call: CallRecord) -> None:
        pass

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        self.ended[turn.response_id] = turn

    def call_ended(self, call: CallRecord) -> None:
        pass


async def greeted(wire: FakeTransport) -> None:
    await wire.expect("config")
    await wire.until_complete(0)


async def started(llm: ScriptedLLM) -> None:
    await llm.started.wait()
    llm.started.clear()


def test_the_comparison_ignores_case_spacing_and_punctuation_only() -> None:
    assert normalized("  What TIME,  do you open?") == "what time do you open"
    assert looks_finished("We open at nine.") and looks_finished("Really?")
    assert not looks_finished("I wanted to ask") and not looks_finished("...")
    one = ChatRequest("system", (Message("user", "What time do you open?"),))
    same = ChatRequest("system", (Message("user", "what time  do you open"),))
    other = ChatRequest("system", (Message("user", "What time do you close?"),))
    new_prompt = ChatRequest("other system", (Message("user", "What time do you open?"),))
    assert signature(one) == signature(same)
    assert signature(one) != signature(other) and signature(one) != signature(new_prompt)


async def test_a_matching_request_gets_the_held_answer_without_asking_again() -> None:
    gate = asyncio.Event()
    llm = ScriptedLLM(["We open ", "at nine.", gate])
    turns = Turns()
    async with session(make_agent(), llm, observers=[turns]) as (_, wire):
        await greeted(wire)
        wire.push(update(QUESTION))
        await started(llm)  # asked before Retell did
        assert [f for f in wire.sent if f.get("response_id", 0) > 0] == []  # and held
        wire.push(asked(1, "what time do you open on saturday"))  # ASR tidied it up
        gate.set()
        await wire.until_complete(1)
    assert wire.said(1) == "We open at nine." and len(llm.requests) == 1
    turn = turns.ended[1]
    assert turn.speculation == "hit" and turn.speculation_wasted == 0
    # The model was asked before the request arrived, and the record says so.
    timings = turn.timings_ms()
    assert timings["llm_request"] is not None and timings["llm_request"] < 0


async def test_a_different_request_drops_the_held_answer_and_asks_again() -> None:
    llm = ScriptedLLM(["We open ", "at nine."], ["On Sundays we are closed."])
    turns = Turns()
    async with session(make_agent(), llm, observers=[turns]) as (_, wire):
        await greeted(wire)
        wire.push(update(QUESTION))
        await started(llm)
        wire.push(asked(1, "What time do you open on Sunday?"))
        await wire.until_complete(1)
    assert wire.said(1) == "On Sundays we are closed."
    assert len(llm.requests) == 2
    assert turns.ended[1].speculation == "miss"


async def test_a_reminder_never_uses_a_held_answer() -> None:
    never = asyncio.Event()
    llm = ScriptedLLM(["We open ", never], ["Are you still there?"])
    turns = Turns()
    async with session(make_agent(), llm, observers=[turns]) as (_, wire):
        await greeted(wire)
        wire.push(update(QUESTION))
        await started(llm)
        wire.push(request(1, reminder=True, transcript=update(QUESTION)["transcript"]))
        await wire.until_complete(1)
    assert wire.said(1) == "Are you still there?"
    assert turns.ended[1].speculation is None
    assert llm.closed == 1  # the held stream was closed, not left running


async def test_no_tool_runs_before_the_request_and_one_runs_after_it() -> None:
    booked: list[str] = []

    @tool(side_effects=True)
    def book(day: str) -> str:
        """Book a visit."""
        booked.append(day)
        return f"Booked {day}."

    llm = ScriptedLLM([tool_call("book", '{"day":"Sat"}')], ["You're booked for Saturday."])
    async with session(make_agent(tools=[book]), llm) as (_, wire):
        await greeted(wire)
        wire.push(update("Book me for Saturday, please."))
        await llm.finished.wait()  # the held stream has its tool call; nothing may run
        assert booked == []
        assert not [f for f in wire.sent if f["response_type"].startswith("tool_call")]
        wire.push(asked(1, "Book me for Saturday please"))
        await wire.until_complete(1)
    assert booked == ["Sat"] and wire.said(1) == "You're booked for Saturday."


async def test_a_caller_who_keeps_talking_costs_at_most_max_per_turn_requests() -> None:
    llm = ScriptedLLM(default=["OK."])
    agent = make_agent(speculation={"enabled": True, "max_per_turn": 2})
    turns = Turns()
    async with session(agent, llm, observers=[turns]) as (_, wire):
        await greeted(wire)
        for words in ("I'd like to book.", "I'd like to book. On Tuesday.", "Or Wednesday."):
            wire.push(update(words))
        wire.push(asked(1, "Or Wednesday."))
        await wire.until_complete(1)
    # Two speculations, both on words the request did not end with, then the real one.
    assert len(llm.requests) == 3
    assert turns.ended[1].speculation == "miss" and turns.ended[1].speculative_requests == 2


async def test_nothing_is_speculated_while_the_agent_is_speaking() -> None:
    gate = asyncio.Event()
    llm = ScriptedLLM(["Sure, ", gate, "one moment."], ["Bye."])
    async with session(make_agent(), llm) as (_, wire):
        await greeted(wire)
        wire.push(asked(1, "Hello?"))
        await wire.expect("response")
        wire.push(update("Hello?", "Actually, never mind."))
        wire.push(asked(2, "Actually, never mind."))  # a barge-in: a normal request
        gate.set()
        await wire.until_complete(2)
    assert len(llm.requests) == 2


@pytest.mark.parametrize("enabled", [False])
async def test_off_by_default_nothing_is_asked_early(enabled: bool) -> None:
    llm = ScriptedLLM(["We open at nine."])
    agent = make_agent(speculation={"enabled": enabled})
    async with session(agent, llm) as (_, wire):
        await greeted(wire)
        wire.push(update(QUESTION))
        wire.push({"interaction_type": "ping_pong", "timestamp": 1})
        await wire.expect("ping_pong")  # the update was read, and nothing was asked
        assert llm.requests == []
        wire.push(asked(1, QUESTION))
        await wire.until_complete(1)
    assert len(llm.requests) == 1
