"""Every rule of a call session, over a real WebSocket, with the real OpenAI SDK.

The agent's brain is :class:`OpenAILLM` pointed at a scripted fake OpenAI server
on loopback, so each test exercises the full path: Retell frame in, socket,
session, SDK, HTTP stream, and frames back out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import agent_on

from callbrain.agent import Agent, RetellConfig
from callbrain.server.app import create_app
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.serve import serve_asgi

FALLBACK = "Sorry, one moment, could you repeat that?"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def make_agent(fake: FakeOpenAIServer, **overrides: Any) -> Agent:
    timeouts = {
        "model": "gpt-test",
        "first_token_timeout_s": overrides.pop("first_token_timeout_s", 5.0),
        "idle_timeout_s": overrides.pop("idle_timeout_s", 5.0),
    }
    fields: dict[str, Any] = {
        "system_prompt": "You are {{persona}} talking to {{first_name}}.",
        "begin_message": "Hello {{first_name}}!",
        "dynamic_variables": {"first_name": "there", "persona": "Ava"},
        "fallback_message": FALLBACK,
    }
    return agent_on(fake, llm=timeouts, **{**fields, **overrides})


@contextlib.asynccontextmanager
async def start_call(agent: Agent, call_id: str = "call-1") -> AsyncIterator[RetellClient]:
    async with serve_agent(agent) as url, RetellClient.connect(url, call_id) as call:
        yield call


async def greeted_call(call: RetellClient) -> RetellClient:
    await call.expect_config()
    await call.expect_begin()
    return call


def response_frames(call: RetellClient, start: int = 0) -> list[dict[str, Any]]:
    return [f for f in call.frames[start:] if f.get("response_type") == "response"]


# ------------------------------------------------------------- opening the call


async def test_config_is_first_then_the_begin_message(fake: FakeOpenAIServer) -> None:
    async with start_call(make_agent(fake)) as call:
        config = await call.expect_config()
        assert config == {
            "response_type": "config",
            "config": {
                "auto_reconnect": True,
                "call_details": True,
                "transcript_with_tool_calls": False,
            },
        }
        begin = await call.expect_begin()
        assert begin.frames == [
            {
                "response_type": "response",
                "response_id": 0,
                "content": "Hello there!",
                "content_complete": True,
            }
        ]


async def test_config_flags_come_from_the_agent(fake: FakeOpenAIServer) -> None:
    flags = RetellConfig(auto_reconnect=False, call_details=False, transcript_with_tool_calls=True)
    async with start_call(make_agent(fake, retell_config=flags)) as call:
        config = await call.expect_config()
        assert config["config"] == {
            "auto_reconnect": False,
            "call_details": False,
            "transcript_with_tool_calls": True,
        }


async def test_empty_begin_message_lets_the_caller_speak_first(fake: FakeOpenAIServer) -> None:
    async with start_call(make_agent(fake, begin_message="")) as call:
        await call.expect_config()
        begin = await call.expect_begin()
        assert begin.text == "" and begin.completes == 1


async def test_greeting_waits_for_call_details_and_uses_its_variables(
    fake: FakeOpenAIServer,
) -> None:
    agent = make_agent(fake, wait_for_call_details=True, call_details_timeout_s=5)
    async with start_call(agent) as call:
        await call.expect_config()
        # Prove the greeting is held: a ping round trip completes and still no response.
        await call.ping()
        assert response_frames(call) == []
        await call.send_call_details(
            {"call_id": "call-1", "retell_llm_dynamic_variables": {"first_name": "Sam"}}
        )
        begin = await call.expect_begin()
        assert begin.text == "Hello Sam!"
        # The call's variables reach the system prompt too.
        await call.ask("Hi")
        assert fake.requests[-1].body["messages"][0] == {
            "role": "system",
            "content": "You are Ava talking to Sam.",
        }


async def test_greeting_goes_out_anyway_when_call_details_never_come(
    fake: FakeOpenAIServer,
) -> None:
    agent = make_agent(fake, wait_for_call_details=True, call_details_timeout_s=0.2)
    async with start_call(agent) as call:
        await call.expect_config()
        begin = await call.expect_begin(timeout=5)
        assert begin.text == "Hello there!" and begin.completes == 1


async def test_a_request_before_the_greeting_supersedes_it(fake: FakeOpenAIServer) -> None:
    # The caller speaks while the agent still waits for call details: response 0 is
    # superseded by response 1 and must never be sent after it.
    fake.script(Reply("Yes, how can I help?"))
    agent = make_agent(fake, wait_for_call_details=True, call_details_timeout_s=0.3)
    async with start_call(agent) as call:
        await call.expect_config()
        turn = await call.ask("Hello, is this the clinic?")
        assert turn.text == "Yes, how can I help?"
        await asyncio.sleep(0.5)  # past the greeting's timeout
        await call.ping()
        assert call.response_turn(0).frames == []
        assert [f["response_id"] for f in response_frames(call)][-1] == turn.response_id


# ------------------------------------------------------------------- keep-alive


async def test_ping_is_answered_while_a_generation_is_streaming(fake: FakeOpenAIServer) -> None:
    # The reply streams two chunks and then stalls: the turn is busy in the middle
    # of its stream for as long as the test likes.
    fake.script(Reply(["We ", "open ", "at ", "nine."], stall_after=2))
    agent = make_agent(fake, first_token_filler_after_s=None, idle_timeout_s=30.0)
    async with start_call(agent) as call:
        await greeted_call(call)
        rid = await call.say("When do you open?")
        await call.wait_for(lambda _: call.response_turn(rid).text == "We open ")
        await call.ping(timestamp=1703302407333)
        pong = [f for f in call.frames if f["response_type"] == "ping_pong"]
        assert pong == [{"response_type": "ping_pong", "timestamp": 1703302407333}]
        # The pong came back while the turn was still mid-stream, not after it.
        assert call.response_turn(rid).completes == 0


# ------------------------------------------------------------------------ turns


async def test_reply_streams_in_chunks_and_completes_exactly_once(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("We open at eight and close at six."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        turn = await call.ask("When are you open?")
        assert turn.text == "We open at eight and close at six."
        assert len(turn.frames) > 2
        assert [f["content_complete"] for f in turn.frames[:-1]] == [False] * (len(turn.frames) - 1)
        assert turn.frames[-1]["content_complete"] is True and turn.completes == 1
        body = fake.requests[0].body
        assert body["model"] == "gpt-test" and body["stream"] is True
        assert body["messages"] == [
            {"role": "system", "content": "You are Ava talking to there."},
            {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "When are you open?"},
        ]


async def test_deltas_join_as_the_model_wrote_them(fake: FakeOpenAIServer) -> None:
    # Real tokenizers cut words and punctuation apart; no space may be added between them.
    fake.script(Reply(["Hello", ",", " I", "'m", " Av", "a", "."]))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        turn = await call.ask("Who is this?")
        assert turn.text == "Hello, I'm Ava."


async def test_newer_request_closes_the_old_stream_at_once_and_silences_it(
    fake: FakeOpenAIServer,
) -> None:
    # The first reply sends one chunk, then the next one only after 30 s.
    fake.script(Reply(["Let me ", "see..."], chunk_delay=30), Reply("Sure, Tuesday works."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        old = await call.say("Can I book")
        await call.wait_for(lambda _: bool(call.response_turn(old).frames))
        mark = len(call.frames)
        new = await call.say("Can I book for Tuesday?")
        # The provider connection of the superseded turn is closed now, not in 30 s.
        await fake.wait_for_outcome(0, "client_disconnected", timeout=3)
        turn = await call.response(new)
        assert turn.text == "Sure, Tuesday works." and turn.completes == 1
        await call.ping()  # flush: anything the server sent before the pong has arrived
        stale = [f for f in response_frames(call, mark) if f["response_id"] == old]
        assert stale == []
        assert call.response_turn(old).completes == 0


async def test_superseded_before_the_first_token_sends_nothing(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The old turn is cut while it waits for its first token (with the filler timer
    # running): it must end as cancelled, not as an error of its own.
    fake.script(Reply("Too late.", ttft=30), Reply("Right away."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        old = await call.say("Hello?")
        await fake.wait_for_requests(1)
        new = await call.say("Hello, anyone?")
        turn = await call.response(new)
        assert turn.text == "Right away."
        await fake.wait_for_outcome(0, "client_disconnected", timeout=3)
        await call.ping()
        assert call.response_turn(old).frames == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_the_troubleshooting_guides_bare_request_gets_an_answer(
    fake: FakeOpenAIServer,
) -> None:
    # Retell's troubleshooting guide tests a server with exactly this frame.
    fake.script(Reply("Hello, how can I help?"))
    async with start_call(make_agent(fake, begin_message="")) as call:
        await greeted_call(call)
        await call.send('{"interaction_type":"response_required","response_id":1,"transcript":[]}')
        turn = await call.response(1)
        assert turn.text == "Hello, how can I help?" and turn.completes == 1
        assert fake.requests[0].body["messages"] == [
            {"role": "system", "content": "You are Ava talking to there."}
        ]


async def test_update_only_does_not_supersede(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("One, two, three, four.", chunk_delay=0.05))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        rid = await call.say("Count for me")
        await call.wait_for(lambda _: bool(call.response_turn(rid).frames))
        call.transcript.append({"role": "user", "content": "mm-hmm"})
        await call.update(turntaking="user_turn")
        turn = await call.response(rid)
        assert turn.text == "One, two, three, four." and turn.completes == 1
        assert fake.requests[0].outcome == "completed"


async def test_stale_and_duplicate_requests_are_ignored(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("Answer five."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        call.transcript.append({"role": "user", "content": "hi"})
        await call.request(response_id=5)
        turn = await call.response(5)
        await call.request(response_id=3)
        await call.request(response_id=5)
        await call.ping()
        assert call.response_turn(3).frames == []
        assert call.response_turn(5).frames == turn.frames
        assert len(fake.requests) == 1


async def test_reminder_gets_its_own_instruction(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("Are you still there?"))
    agent = make_agent(fake, reminder_prompt="(Silence. Check in briefly.)")
    async with start_call(agent) as call:
        await greeted_call(call)
        turn = await call.remind()
        assert turn.text == "Are you still there?" and turn.completes == 1
        messages = fake.requests[0].body["messages"]
        assert messages[-1] == {"role": "user", "content": "(Silence. Check in briefly.)"}
        assert messages[-2] == {"role": "assistant", "content": "Hello there!"}


# --------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_provider_error_speaks_the_fallback_and_completes(
    fake: FakeOpenAIServer, status: int
) -> None:
    fake.script(Reply(status=status))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        turn = await call.ask("Hello?")
        assert turn.text == FALLBACK and turn.completes == 1
        assert turn.frames[-1]["content_complete"] is True


async def test_dropped_stream_keeps_what_was_said_then_apologises(fake: FakeOpenAIServer) -> None:
    fake.script(Reply(["We are open ", "from nine ", "to five."], drop_after=1))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        turn = await call.ask("Hours?")
        assert turn.text == "We are open " + FALLBACK  # one space, not two
        assert turn.completes == 1


async def test_first_token_deadline_speaks_the_fallback(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("never", stall_after=0))
    async with start_call(make_agent(fake, first_token_timeout_s=0.3)) as call:
        await greeted_call(call)
        turn = await call.ask("Hello?")
        assert turn.text == FALLBACK and turn.completes == 1
        await fake.wait_for_outcome(0, "client_disconnected", timeout=3)


async def test_idle_deadline_mid_answer_speaks_the_fallback(fake: FakeOpenAIServer) -> None:
    fake.script(Reply(["Our address ", "is twelve..."], stall_after=1))
    async with start_call(make_agent(fake, idle_timeout_s=0.3)) as call:
        await greeted_call(call)
        turn = await call.ask("Where are you?")
        assert turn.text == "Our address " + FALLBACK and turn.completes == 1


async def test_next_turn_works_after_a_failure(fake: FakeOpenAIServer) -> None:
    fake.script(Reply(status=500), Reply("Back to normal."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        assert (await call.ask("One")).text == FALLBACK
        assert (await call.ask("Two")).text == "Back to normal."


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x01binary",
        "{not json",
        "[]",
        '{"interaction_type": "response_required", "response_id": "seven"}',
        '{"interaction_type": "update_only", "transcript": "oops"}',
        '{"interaction_type": "ping_pong"}',
        '{"interaction_type": "something_new", "x": 1}',
        '{"no_type": true}',
    ],
)
async def test_malformed_frame_is_ignored_and_the_call_goes_on(
    fake: FakeOpenAIServer, bad: str | bytes
) -> None:
    fake.script(Reply("Still here."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        await call.send(bad)
        await call.ping()
        turn = await call.ask("Hello?")
        assert turn.text == "Still here." and turn.completes == 1
        assert not call.closed


async def test_a_call_that_drops_does_not_touch_another(fake: FakeOpenAIServer) -> None:
    agent = make_agent(fake)
    fake.script(Reply(["Let me ", "check..."], chunk_delay=30))
    async with serve_agent(agent) as url, RetellClient.connect(url, "call-a") as a:
        await greeted_call(a)
        rid = await a.say("Book me in")
        await a.wait_for(lambda _: bool(a.response_turn(rid).frames))
        async with RetellClient.connect(url, "call-b") as b:
            await greeted_call(b)
            await a.close()
            # Call A's provider stream is closed with its socket.
            await fake.wait_for_outcome(0, "client_disconnected", timeout=3)
            fake.script(Reply("Hello B."))
            turn = await b.ask("Hi")
            assert turn.text == "Hello B." and turn.completes == 1


async def test_many_overlapping_requests_leave_exactly_one_live_answer(
    fake: FakeOpenAIServer,
) -> None:
    # The caller keeps talking: 8 requests in quick succession, like Retell under barge-in.
    fake.default = Reply(["Okay, ", "noted."], chunk_delay=0.02)
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        ids = [await call.say(f"part {i}") for i in range(8)]
        final = await call.response(ids[-1])
        assert final.text == "Okay, noted." and final.completes == 1
        await call.ping()
        for rid in ids[:-1]:
            assert call.response_turn(rid).completes == 0
        completes = [f for f in response_frames(call) if f["content_complete"]]
        assert [f["response_id"] for f in completes] == [0, ids[-1]]


async def test_no_frame_carries_null(fake: FakeOpenAIServer) -> None:
    fake.script(Reply(status=500), Reply("Fine."))
    async with start_call(make_agent(fake)) as call:
        await greeted_call(call)
        await call.ping()
        await call.ask("a")
        await call.ask("b")
        await call.remind()
        for frame in call.frames:
            assert "response_type" in frame
            assert all(value is not None for value in frame.values()), frame
            if frame["response_type"] == "response":
                assert isinstance(frame["response_id"], int)
                assert isinstance(frame["content"], str)
                assert isinstance(frame["content_complete"], bool)


async def test_socket_closing_mid_turn_stops_the_session_quietly(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(Reply("Slow answer", ttft=30))
    app = create_app(make_agent(fake))
    runtime = app.state.runtime
    caplog.set_level(logging.INFO)
    async with serve_asgi(app) as http:
        url = "ws" + http.removeprefix("http") + "/llm-websocket"
        async with RetellClient.connect(url, "call-x") as call:
            await greeted_call(call)
            await call.say("Hello?")
            await fake.wait_for_requests(1)
            assert runtime.active_calls == 1
        await fake.wait_for_outcome(0, "client_disconnected", timeout=3)
        await asyncio.wait_for(runtime.idle.wait(), 5)
        assert runtime.active_calls == 0 and not runtime.sessions
    # Quietly: a caller hanging up mid-turn is routine, not a warning or an error.
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert "call ended (hangup)" in caplog.text
