"""The session's error paths, driven frame by frame with no socket (see
:mod:`callbrain.testing.harness`): a tool that raises, a frame that cannot be
built, a store that hangs or fails, a reset mid-tool, a model that never stops.

Every test ends by checking the two rules that matter most on a phone line:
each live response got exactly one ``content_complete``, and the session ended.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from callbrain.agent import Agent
from callbrain.call.memory import CallMemory
from callbrain.call.record import CallRecord, TurnRecord
from callbrain.llm.base import LLMError
from callbrain.retell.actions import Action
from callbrain.stores import GuardedStore, MemoryStore
from callbrain.testing.harness import (
    FakeTransport,
    ScriptedLLM,
    ping,
    request,
    session,
    tool_call,
)
from callbrain.tools import ResultStore, Toolbox, ToolContext, tool

FALLBACK = "Sorry, could you say that again?"


def make_agent(**fields: Any) -> Agent:
    base: dict[str, Any] = {
        "name": "paths",
        "begin_message": "Hi.",
        "fallback_message": FALLBACK,
        "holding_messages": [],
        "tool_filler_after_s": None,
        "first_token_filler_after_s": None,
    }
    return Agent(**{**base, **fields})


def completes(wire: FakeTransport, response_id: int) -> int:
    return sum(1 for f in wire.responses(response_id) if f["content_complete"])


async def opened(wire: FakeTransport) -> None:
    await wire.expect("config")
    assert (await wire.until_complete(0))[-1]["content"] == "Hi."


class Recorder:
    """A call observer that keeps what it is told."""

    def __init__(self) -> None:
        self.ended: list[TurnRecord] = []
        self.calls: list[CallRecord] = []

    def call_started(self, call: CallRecord) -> None:
        pass

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        pass

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        self.ended.append(turn)

    def call_ended(self, call: CallRecord) -> None:
        self.calls.append(call)


class HangingStore(MemoryStore):
    """A store that never answers (a paused Redis)."""

    async def get(self, key: str) -> bytes | None:
        await asyncio.Event().wait()
        return None

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        await asyncio.Event().wait()


class WatchedStore(MemoryStore):
    """Keeps every call memory written, to see what a restore writes."""

    def __init__(self) -> None:
        super().__init__()
        self.memories: list[CallMemory] = []

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        if key.startswith("call:"):
            self.memories.append(CallMemory.from_json(value))
        await super().set(key, value, ttl_s=ttl_s)


class FlakyWrites(MemoryStore):
    """Reads work; the first ``failures`` writes of results fail (a read-only replica
    for a moment)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        if key.startswith("result:") and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("READONLY You can't write against a read only replica.")
        await super().set(key, value, ttl_s=ttl_s)

    def stored_keys(self) -> list[str]:
        return list(self._entries)


# ------------------------------------------------------------------ the basics


async def test_a_pong_goes_out_while_a_turn_is_mid_stream() -> None:
    gate = asyncio.Event()
    llm = ScriptedLLM(["Let me ", gate, "see."])
    async with session(make_agent(), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        assert (await wire.expect("response"))["content"] == "Let me "
        wire.push(ping(42))
        # The turn is blocked inside the model; the pong cannot be waiting behind it.
        assert await wire.next() == {"response_type": "ping_pong", "timestamp": 42}
        gate.set()
        await wire.until_complete(1)
    assert wire.said(1) == "Let me see." and completes(wire, 1) == 1


async def test_a_barge_in_closes_the_stream_and_the_old_id_never_speaks_again() -> None:
    never = asyncio.Event()
    llm = ScriptedLLM(["First ", never], ["Second."])
    recorder = Recorder()
    async with session(make_agent(), llm, observers=[recorder]) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.expect("response")
        wire.push(request(2, "Actually, wait."))
        await wire.until_complete(2)
    assert llm.closed == 1  # the provider stream was closed, not left running
    assert completes(wire, 1) == 0 and completes(wire, 2) == 1
    first_of_2 = next(i for i, f in enumerate(wire.sent) if f.get("response_id") == 2)
    assert all(f.get("response_id") != 1 for f in wire.sent[first_of_2:])
    outcomes = {t.response_id: (t.outcome, t.spoken) for t in recorder.ended}
    assert outcomes[1] == ("superseded", "First ") and outcomes[2] == ("completed", "Second.")


# ---------------------------------------------------------------------- tools


async def test_a_tool_that_raises_tells_the_model_and_the_turn_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @tool
    def lookup(name: str) -> str:
        """Look a patient up."""
        raise RuntimeError("database password is hunter2")

    llm = ScriptedLLM([tool_call("lookup", '{"name":"Ann"}')], ["I could not find that."])
    async with session(make_agent(tools=[lookup]), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        frames = await wire.until_complete(1)
    result = next(f for f in frames if f["response_type"] == "tool_call_result")
    assert result["successful"] is False and "hunter2" not in result["content"]
    assert "hunter2" not in wire.said(1) and wire.said(1) == "I could not find that."
    assert completes(wire, 1) == 1
    assert "tool lookup crashed" in caplog.text


async def test_a_transfer_to_an_int_fails_in_the_tool_with_a_clear_error_and_the_turn_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @tool
    def escalate(context: ToolContext) -> str:
        """Hand the caller to a human."""
        context.transfer(4155550100)  # type: ignore[arg-type]  # the mistake under test
        return "transferring"

    llm = ScriptedLLM([tool_call("escalate")], ["Let me find someone else."])
    async with session(make_agent(tools=[escalate]), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    assert completes(wire, 1) == 1
    assert all("transfer_number" not in f for f in wire.responses(1))
    assert "E.164" in caplog.text and "int 4155550100" in caplog.text


async def test_text_that_is_not_valid_utf8_loses_only_those_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A lone surrogate cannot be UTF-8: as it was, no frame holding it could be sent.
    llm = ScriptedLLM(["Fine ", "\ud800", "thanks."])
    async with session(make_agent(), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    assert wire.said(1) == "Fine thanks." and completes(wire, 1) == 1
    assert "dropped characters that are not valid text" in caplog.text


async def test_a_final_frame_that_cannot_be_built_still_completes_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug that slipped past the action's own checks: the frame refuses the value.
    @tool
    def hang_up(context: ToolContext) -> str:
        """Hang up."""
        action = Action("transfer", transfer_number="+14155550100")
        object.__setattr__(action, "transfer_number", 4155550100)  # past the checks
        context.request_action(action)
        return "bye"

    llm = ScriptedLLM([tool_call("hang_up")])
    async with session(make_agent(tools=[hang_up]), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    assert completes(wire, 1) == 1
    assert "could not build a frame; sending it without its extras" in caplog.text


async def test_a_hanging_store_never_books_blind_and_the_turn_still_completes() -> None:
    booked: list[str] = []

    @tool(side_effects=True, timeout_s=0.3)
    def book(day: str) -> str:
        """Book a visit."""
        booked.append(day)
        return f"Booked {day}."

    # Nobody can tell whether another instance is booking this right now: waiting
    # for the store is bounded by the tool's timeout, and then nothing is booked.
    store = GuardedStore(HangingStore(), ttl_s=60, timeout_s=0.05)
    llm = ScriptedLLM([tool_call("book", '{"day":"Tue"}')], ["Sorry, please try again."])
    async with session(make_agent(tools=[book]), llm, store=store) as (call, wire):
        await opened(wire)
        wire.push(request(1))
        frames = await wire.until_complete(1)
    assert booked == [] and completes(wire, 1) == 1
    [result] = [f for f in frames if f["response_type"] == "tool_call_result"]
    assert result["successful"] is False and "Nothing was done" in result["content"]
    assert wire.said(1) == "Sorry, please try again."
    assert call.lifecycle.closed and store.failures >= 1


async def test_a_result_the_store_cannot_take_yet_is_kept_retried_and_never_booked_twice() -> None:
    booked: list[str] = []

    @tool(side_effects=True)
    def book(day: str) -> str:
        """Book a visit."""
        booked.append(day)
        return f"Booked {day}."

    backend = FlakyWrites(failures=3)
    store = GuardedStore(backend, ttl_s=60)
    toolbox = Toolbox({"book": book}, ResultStore(store))
    call = tool_call("book", '{"day":"Tue"}')
    llm = ScriptedLLM([call], ["Booked."], [tool_call("book", '{"day":"Tue"}', "c2")], ["Done."])
    agent = make_agent(tools=[book])
    async with session(agent, llm, store=store, toolbox=toolbox) as (session_, wire):
        await opened(wire)
        wire.push(request(1, "Book Tuesday."))
        first = await wire.until_complete(1)
        wire.push(request(2, "Did that work? Book it again."))
        second = await wire.until_complete(2)
    await toolbox.aclose()  # the background store retries are over
    assert booked == ["Tue"]  # the repeat was answered from the call's own history
    results = [f for f in first + second if f["response_type"] == "tool_call_result"]
    assert [r["successful"] for r in results] == [True, True]
    assert "was not repeated" in results[1]["content"]
    assert len(session_.tool_history) == 2
    # Stored in the end, and the run lock let go once it was.
    stored = [k for k in backend.stored_keys() if k.startswith("result:")]
    assert len(stored) == 1 and not [k for k in backend.stored_keys() if k.startswith("lock:")]


async def test_a_reset_mid_tool_lets_the_booking_finish_for_the_reconnect() -> None:
    booked: list[str] = []
    release = asyncio.Event()
    started = asyncio.Event()

    @tool(side_effects=True)
    async def book(day: str) -> str:
        """Book a visit."""
        started.set()
        await release.wait()
        booked.append(day)
        return f"Booked {day}."

    store = GuardedStore(MemoryStore(), ttl_s=60)
    agent = make_agent(tools=[book])
    llm = ScriptedLLM([tool_call("book", '{"day":"Tue"}')])
    async with session(agent, llm, store=store) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await started.wait()
        wire.reset()  # the connection dies; no close frame
        release.set()  # the booking finishes in the background, stored for the reconnect
    assert booked == ["Tue"]
    again = ScriptedLLM([tool_call("book", '{"day":"Tue"}', "c9")], ["All set for Tuesday."])
    async with session(agent, again, store=store) as (call, wire):
        await wire.expect("config")
        assert (await wire.until_complete(0))[-1]["content"] == ""  # no second greeting
        wire.push(request(2, "Book Tuesday."))
        frames = await wire.until_complete(2)
    assert booked == ["Tue"] and call.resumed
    result = next(f for f in frames if f["response_type"] == "tool_call_result")
    assert "was not repeated" in result["content"]


# ---------------------------------------------------------------- the model


async def test_a_model_error_mid_answer_keeps_what_was_said_and_apologises() -> None:
    llm = ScriptedLLM(["We open at ", LLMError("boom", provider="scripted")])
    async with session(make_agent(), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    assert wire.said(1) == f"We open at {FALLBACK}" and completes(wire, 1) == 1


async def test_a_model_that_never_stops_is_cut_and_completed_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm = ScriptedLLM(["blah " for _ in range(10_000)])
    async with session(make_agent(max_response_chars=100), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    said = wire.said(1)
    assert 100 <= len(said) < 110 and FALLBACK not in said
    assert completes(wire, 1) == 1 and llm.closed == 1
    assert "max_response_chars" in caplog.text


async def test_a_request_that_cannot_be_built_gets_the_fallback_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("template engine exploded")

    monkeypatch.setattr("callbrain.call.responder.build_chat_request", broken)
    llm = ScriptedLLM()
    async with session(make_agent(), llm) as (_, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.until_complete(1)
    assert wire.said(1) == FALLBACK and completes(wire, 1) == 1 and not llm.requests


# ------------------------------------------------------------ frames and limits


async def test_deeply_nested_call_details_are_ignored_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deep = "[" * 980 + '"x"' + "]" * 980  # more than any JSON encoder would write
    llm = ScriptedLLM(["Still here."])
    async with session(make_agent(), llm) as (call, wire):
        await opened(wire)
        wire.push(
            '{"interaction_type":"call_details","call":{"retell_llm_dynamic_variables":'
            f'{{"v":{deep}}}}}}}'
        )
        wire.push(request(1))
        await wire.until_complete(1)
    assert wire.said(1) == "Still here." and call.call is None
    assert "nested deeper than 32" in caplog.text


async def test_an_unknown_interaction_type_is_logged_briefly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with session(make_agent(), ScriptedLLM()) as (_, wire):
        await opened(wire)
        wire.push({"interaction_type": "x" * 900_000})
        wire.push(ping(1))
        await wire.expect("ping_pong")
    line = next(r.getMessage() for r in caplog.records if "unknown interaction_type" in r.message)
    assert len(line) < 200


async def test_a_call_that_sends_nothing_for_max_idle_s_is_closed() -> None:
    agent = make_agent(server={"access": {"max_idle_s": 0.05}})
    recorder = Recorder()
    async with session(agent, ScriptedLLM(), observers=[recorder]) as (_, wire):
        await opened(wire)
        await wire.server_closed.wait()
    assert wire.closed_by_server == 1000 and recorder.calls[0].end == "inactive"


# ----------------------------------------------------------------- reconnects


async def test_a_reconnect_with_nothing_done_yet_does_not_greet_again() -> None:
    store = GuardedStore(MemoryStore(), ttl_s=60)
    agent = make_agent()
    async with session(agent, ScriptedLLM(), store=store) as (_, wire):
        await opened(wire)
        wire.reset()
    async with session(agent, ScriptedLLM(), store=store) as (call, wire):
        await wire.expect("config")
        assert (await wire.until_complete(0))[-1]["content"] == ""
    assert call.resumed and call.record.socket_number == 2


async def test_agent_overrides_are_sent_again_on_the_new_socket() -> None:
    store = GuardedStore(MemoryStore(), ttl_s=60)
    agent = make_agent()
    async with session(agent, ScriptedLLM(), store=store) as (call, wire):
        await opened(wire)
        assert await call.control.update_agent(responsiveness=0.4)
        await wire.expect("update_agent")
        wire.reset()
    async with session(agent, ScriptedLLM(), store=store) as (_, wire):
        assert (await wire.next())["response_type"] == "config"
        update = await wire.next()
    assert update == {"response_type": "update_agent", "agent_config": {"responsiveness": 0.4}}


async def test_two_drops_in_quick_succession_keep_the_booking() -> None:
    booked: list[str] = []

    @tool(side_effects=True)
    def book(day: str) -> str:
        """Book a visit."""
        booked.append(day)
        return f"Booked {day}."

    watched = WatchedStore()
    store = GuardedStore(watched, ttl_s=60)
    agent = make_agent(tools=[book])
    call_frame = {"interaction_type": "call_details", "call": {"call_id": "call-1"}}
    async with session(agent, ScriptedLLM([tool_call("book", '{"day":"Tue"}')]), store=store) as (
        _,
        wire,
    ):
        await opened(wire)
        wire.push(call_frame)
        wire.push(request(1))
        await wire.until_complete(1)
        wire.reset()
    # The second socket drops as soon as it has restored: nothing new happened on it.
    async with session(agent, ScriptedLLM(), store=store) as (_, wire):
        await wire.expect("config")
        wire.reset()
    async with session(agent, ScriptedLLM(["You're booked for Tuesday."]), store=store) as (
        call,
        wire,
    ):
        await wire.expect("config")
        wire.push(request(2, "Am I booked?"))
        await wire.until_complete(2)
    assert booked == ["Tue"]
    assert [e.call.name for e in call.tool_history] == ["book"]
    assert call.record.socket_number == 3
    assert call.call == {"call_id": "call-1"}
    # Restore first, save after: once the booking was saved, no later write forgot it.
    booked_at = next(i for i, m in enumerate(watched.memories) if m.tool_history)
    assert all(m.tool_history and m.call for m in watched.memories[booked_at:])


# --------------------------------------------------------------------- shutdown


async def test_a_drain_cuts_the_open_turn_between_chunks_and_completes_it() -> None:
    never = asyncio.Event()
    llm = ScriptedLLM(["Our hours are ", never])
    async with session(make_agent(), llm) as (call, wire):
        await opened(wire)
        wire.push(request(1))
        await wire.expect("response")
        await call.finish_turns(grace=0.0)
        frames = await wire.until_complete(1)
        assert frames[-1] == {
            "response_type": "response",
            "response_id": 1,
            "content": "",
            "content_complete": True,
        }
        wire.push(request(2))  # asked while draining: completed empty, Retell asks again
        await wire.until_complete(2)
    assert wire.said(2) == "" and completes(wire, 1) == completes(wire, 2) == 1
    assert len(llm.requests) == 1


async def test_the_session_ends_quietly_when_the_socket_dies_mid_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()
    llm = ScriptedLLM(["Let me ", never])
    recorder = Recorder()
    with caplog.at_level(logging.INFO):
        async with session(make_agent(), llm, observers=[recorder]) as (call, wire):
            await opened(wire)
            wire.push(request(1))
            await wire.expect("response")
            wire.reset()
    assert call.lifecycle.closed and llm.closed == 1
    assert recorder.calls[0].end == "drop"
    assert [t.outcome for t in recorder.ended if t.response_id == 1] == ["dropped"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
