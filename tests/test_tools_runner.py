"""The tool runner's own rules, below the session: idempotency, races and the store."""

from __future__ import annotations

import asyncio

from tool_samples import RecordingSink

from callbrain.call.control import CallControl
from callbrain.llm.chat import ToolCall
from callbrain.retell.actions import TurnActions
from callbrain.retell.frames import ToolCallInvocationFrame, ToolCallResultFrame
from callbrain.stores import GuardedStore, MemoryStore
from callbrain.tools import (
    ResultStore,
    StoredResult,
    Toolbox,
    ToolError,
    ToolRun,
    ToolRunner,
    tool,
)
from callbrain.tools.idempotency import idempotency_key


def results() -> ResultStore:
    return ResultStore(GuardedStore(MemoryStore(), ttl_s=60))


def make_runner(
    *tools: object, store: ResultStore | None = None
) -> tuple[ToolRunner, RecordingSink, list[tuple[ToolRun, int]]]:
    sink = RecordingSink()
    recorded: list[tuple[ToolRun, int]] = []
    runner = ToolRunner(
        toolbox=Toolbox(
            {t.name: t for t in tools},  # type: ignore[attr-defined]
            store if store is not None else results(),
        ),
        control=CallControl("call-1", sink, {}, lambda: None),
        send=sink.send_frame,
        record=lambda run, anchor: recorded.append((run, anchor)),
    )
    return runner, sink, recorded


async def test_identical_parallel_calls_of_a_side_effecting_tool_run_once() -> None:
    runs: list[str] = []

    @tool(side_effects=True)
    async def charge(amount: int) -> str:
        """Charge the card."""
        await asyncio.sleep(0)
        runs.append("charged")
        return f"charged {amount}"

    runner, sink, recorded = make_runner(charge)
    calls = [ToolCall("a", "charge", '{"amount": 5}'), ToolCall("b", "charge", '{"amount":5}')]
    first, second = await runner.run_all(calls, TurnActions(), anchor=3)
    assert runs == ["charged"]
    assert first.output.content == "charged 5" and not first.replayed
    assert second.replayed and second.output.content.startswith("charged 5 (This was already")
    assert [r.call.id for r, _ in recorded] == ["a", "b"] and {a for _, a in recorded} == {3}
    kinds = [type(f) for f in sink.frames]
    assert kinds.count(ToolCallInvocationFrame) == 2 and kinds.count(ToolCallResultFrame) == 2


async def test_a_stored_result_answers_without_running_and_failures_are_not_stored() -> None:
    attempts: list[int] = []

    @tool(side_effects=True)
    def book(slot: str) -> str:
        """Book a slot."""
        attempts.append(1)
        if len(attempts) == 1:
            raise ToolError("calendar busy")
        return f"booked {slot}"

    store = results()
    runner, _, _ = make_runner(book, store=store)
    [failed] = await runner.run_all([ToolCall("a", "book", '{"slot":"9"}')], TurnActions(), 0)
    [booked] = await runner.run_all([ToolCall("b", "book", '{"slot":"9"}')], TurnActions(), 0)
    [again] = await runner.run_all([ToolCall("c", "book", '{"slot":"9"}')], TurnActions(), 0)
    assert failed.output.is_error and not failed.replayed
    assert booked.output.content == "booked 9" and not booked.replayed
    assert again.replayed and len(attempts) == 2
    key = idempotency_key("call-1", "book", {"slot": "9"})
    assert await store.get(key) == StoredResult("booked 9", True)


async def test_idempotency_keys_ignore_key_order_but_not_values_or_calls() -> None:
    key = idempotency_key("c1", "book", {"a": 1, "b": "x"})
    assert key == idempotency_key("c1", "book", {"b": "x", "a": 1})
    assert key != idempotency_key("c1", "book", {"a": 2, "b": "x"})
    assert key != idempotency_key("c2", "book", {"a": 1, "b": "x"})
    assert key != idempotency_key("c1", "cancel", {"a": 1, "b": "x"})
