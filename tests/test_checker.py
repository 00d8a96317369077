"""The protocol checker: it catches each rule against a server that breaks it,
and it does not cry wolf against one that keeps them (or against callbrain)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio
from misbehaving_server import MODES, app
from support import in_module_loop

from callbrain.testing import RetellClient, serve_asgi
from callbrain.testing.checker import RULES, ProtocolChecker


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def misbehaving() -> AsyncIterator[str]:
    async with serve_asgi(app) as http:
        yield "ws" + http.removeprefix("http") + "/llm-websocket"


def response(rid: int, content: str, *, complete: bool = False) -> str:
    frame = {"response_type": "response", "response_id": rid, "content": content}
    return orjson.dumps({**frame, "content_complete": complete}).decode()


def test_every_rule_has_a_misbehaving_mode() -> None:
    assert set(RULES) == set(MODES) - {"good"}


def finished(call: RetellClient, rid: int) -> bool:
    return any(f.get("metadata") == {"finished": rid} for f in call.frames)


@in_module_loop
@pytest.mark.parametrize("mode", MODES)
async def test_the_checker_catches_each_broken_rule(misbehaving: str, mode: str) -> None:
    async with RetellClient.connect(misbehaving, mode) as call:
        await call.send({"interaction_type": "ping_pong", "timestamp": 1})
        first = await call.say("When do you close?")
        await call.wait_for(lambda _: bool(call.response_turn(first).frames))
        # Mid-answer: the caller barges in.
        last = await call.say("Sorry, when do you close today?")
        await call.wait_for(lambda _: finished(call, last))
        if mode == "stale_frame":  # the old answer streams on after the new one
            await call.wait_for(lambda _: finished(call, first))
        if mode != "ping_missed":
            await call.wait_for(
                lambda frames: any(f["response_type"] == "ping_pong" for f in frames)
            )
        # Judged as if the ping deadline had passed: no waiting for it.
        later = time.monotonic() + call.checker.ping_deadline_s + 1
        rules = {v.rule for v in call.checker.finish(later)}
    if mode == "good":
        assert rules == set()
    else:
        assert mode in rules, f"{mode} not caught; saw {sorted(rules)}"


def test_a_chunk_in_flight_when_the_caller_barges_in_is_not_stale() -> None:
    checker = ProtocolChecker()
    old = {"interaction_type": "response_required", "response_id": 1, "transcript": []}
    checker.on_sent(old, 0.0)
    checker.on_sent({**old, "response_id": 2}, 1.0)
    # Written by the server before it read request 2: legitimately still arriving.
    checker.on_received(
        response(
            1,
            "a",
        ),
        1.001,
    )
    assert checker.violations == []
    # A frame for 2 proves the server read request 2; anything for 1 after it is stale.
    checker.on_received(response(2, "b", complete=True), 1.1)
    checker.on_received(
        response(
            1,
            "c",
        ),
        1.2,
    )
    assert [v.rule for v in checker.violations] == ["stale_frame"]
    assert checker.stale_frames == 1


def test_a_pong_is_proof_the_server_read_the_newer_request() -> None:
    checker = ProtocolChecker()
    request = {"interaction_type": "response_required", "response_id": 1, "transcript": []}
    checker.on_sent(request, 0.0)
    checker.on_sent({**request, "response_id": 2}, 1.0)
    checker.on_sent({"interaction_type": "ping_pong", "timestamp": 5}, 1.01)
    checker.on_received('{"response_type":"ping_pong","timestamp":5}', 1.02)
    checker.on_received(
        response(
            1,
            "late",
        ),
        1.03,
    )
    assert [v.rule for v in checker.violations] == ["stale_frame"]
    assert checker.ping_rtts == [pytest.approx(0.01)]


def test_a_superseded_begin_message_is_stale_too() -> None:
    checker = ProtocolChecker()
    checker.on_received('{"response_type":"config","config":{"call_details":true}}', 0.0)
    request = {"interaction_type": "response_required", "response_id": 1, "transcript": []}
    checker.on_sent(request, 0.5)
    checker.on_received(response(1, "Yes?", complete=True), 0.6)
    checker.on_received(response(0, "Hi!", complete=True), 0.7)
    assert [(v.rule, v.response_id) for v in checker.violations] == [("stale_frame", 0)]


def test_turn_timings() -> None:
    checker = ProtocolChecker()
    request = {"interaction_type": "response_required", "response_id": 1, "transcript": []}
    checker.on_sent(request, 10.0)
    checker.on_received(response(1, "Sure, "), 10.2)
    checker.on_received(response(1, "we open at nine. "), 10.3)
    checker.on_received(response(1, "Bye", complete=True), 10.4)
    turn = checker.turns[1]
    assert turn.ms(turn.first_text_at) == pytest.approx(200)
    assert turn.ms(turn.first_sentence_at) == pytest.approx(300)
    assert turn.ms(turn.completed_at) == pytest.approx(400)
    assert turn.text == "Sure, we open at nine. Bye"
    assert checker.finish(11.0) == []
