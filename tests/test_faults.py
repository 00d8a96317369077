"""Fault injection through the fake providers, over a real call, for both wire formats.

Every fault the resilience issue lists (a stall before the first token, a stall
mid-stream, 429 and 500, a connection reset, a port nobody listens on, a slow
tool, a tool past its timeout) is played through the whole stack: Retell frames
in, the session, the real OpenAI or Anthropic SDK against a scripted fake on
loopback, and frames back out. Each test checks

* the exact text the caller hears (the answer, the fallback line, a filler, or
  the words already said followed by the fallback line), never an error;
* exactly one ``content_complete`` for every response id asked for, and no
  protocol violation at all (:class:`~callbrain.testing.ProtocolChecker`);
* that the call goes on: the next turn is answered normally.

The secondary provider, when a test configures one, speaks the *other* wire
format, so failover is exercised across formats. Deadlines are tenths of a
second and no test asserts on a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel
from support import BACKENDS, RemoteBackend, in_module_loop

from callbrain.agent import Agent
from callbrain.testing import FakeLLMServer, FakeToolCall, Reply, RetellClient, serve_agent
from callbrain.tools import Tool, tool

FALLBACK = "Sorry, could you say that again?"
FIRST_TOKEN_FILLER = "Just a second."
HOLDING = "Let me check."
TOOL_FILLER = "Still working on it."

STALL = 30.0
"""A time to first token nobody waits for: the fake is cut off long before."""
DEADLINE = 0.2
"""First-token and idle deadlines of the provider under test; also how long the
slow tools take, and the timeout of the one that hangs."""
FILLER_AFTER = 0.05
"""When fillers are due: well before any deadline or slow tool (timers on one
event loop fire in order, so this does not make the tests timing-dependent)."""
GENEROUS = 5.0
"""Deadlines of providers that are not supposed to miss them."""

# One pair of fake providers per module and backend, reset for each test.
pytestmark = in_module_loop


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> RemoteBackend:
    return BACKENDS[request.param]


def other(backend: RemoteBackend) -> RemoteBackend:
    """The backend with the other wire format: the secondary provider."""
    [name] = set(BACKENDS) - {backend.name}
    return BACKENDS[name]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def primary_server(backend: RemoteBackend) -> AsyncIterator[FakeLLMServer]:
    async with backend.fake() as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secondary_server(backend: RemoteBackend) -> AsyncIterator[FakeLLMServer]:
    async with other(backend).fake() as running:
        yield running


@pytest.fixture
def _clean_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own provider settings must not leak into these tests."""
    for known in BACKENDS.values():
        for name in known.env:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def primary(primary_server: FakeLLMServer, _clean_provider_env: None) -> FakeLLMServer:
    primary_server.reset()
    return primary_server


@pytest.fixture
def secondary(secondary_server: FakeLLMServer, _clean_provider_env: None) -> FakeLLMServer:
    secondary_server.reset(default=Reply("The backup answers."))
    return secondary_server


def closed_port_url(backend: RemoteBackend) -> str:
    """A base URL for ``backend`` on a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{backend.fake.api_prefix}"


def llm(backend: RemoteBackend, where: FakeLLMServer | str, **options: Any) -> BaseModel:
    """``backend``'s config pointed at a fake (or a URL): no retries, generous deadlines."""
    settings = {
        "provider": backend.name,
        "model": "test-model",
        "base_url": where if isinstance(where, str) else where.base_url,
        "api_key": "test-key",
        "max_retries": 0,
        "first_token_timeout_s": GENEROUS,
        "idle_timeout_s": GENEROUS,
        **options,
    }
    return backend.config.model_validate(settings)


def make_agent(primary: BaseModel, *fallbacks: BaseModel, **overrides: Any) -> Agent:
    """An agent whose lines are all distinct, with fillers off unless a test turns them on."""
    fields: dict[str, Any] = {
        "name": "faults",
        "system_prompt": "You are a clinic receptionist.",
        "begin_message": "Hello.",
        "fallback_message": FALLBACK,
        "first_token_filler_after_s": None,
        "first_token_filler_message": FIRST_TOKEN_FILLER,
        "holding_messages": [HOLDING],
        "tool_filler_after_s": None,
        "tool_filler_message": TOOL_FILLER,
        "llm": primary,
        "fallback_llms": list(fallbacks),
        **overrides,
    }
    return Agent(**fields)


@contextlib.asynccontextmanager
async def call_with(agent: Agent) -> AsyncIterator[RetellClient]:
    """A greeted call; when the test's block ends without error, the whole call
    is checked (see :func:`assert_call_was_clean`)."""
    async with serve_agent(agent) as url, RetellClient.connect(url, "fault-call") as call:
        await call.expect_config()
        await call.expect_begin()
        yield call
        await assert_call_was_clean(call)


async def assert_call_was_clean(call: RetellClient) -> None:
    """Still open, each request completed exactly once, and no protocol violation."""
    await call.ping()  # everything the server sent before the echo has arrived
    assert not call.closed
    requested = [
        frame["response_id"]
        for frame in call.sent
        if frame.get("interaction_type") in ("response_required", "reminder_required")
    ]
    assert requested, "the test asked nothing"
    for rid in requested:
        assert call.response_turn(rid).completes == 1, f"response {rid}"
    assert call.checker.finish(time.monotonic()) == []


async def answered_normally(call: RetellClient, fake: FakeLLMServer) -> None:
    """The call goes on after the fault: the next turn gets the model's answer."""
    fake.script(Reply("Back to normal."))
    turn = await call.ask("Are you still there?")
    assert turn.text == "Back to normal."
    assert turn.completes == 1


def calls(*names: str) -> list[FakeToolCall]:
    return [FakeToolCall(name, {}) for name in names]


def of_type(call: RetellClient, kind: str) -> list[dict[str, Any]]:
    return [f for f in call.frames if f.get("response_type") == kind]


def tool_outputs(body: dict[str, Any]) -> list[str]:
    """The tool results a provider was sent, in either wire format."""
    found = []
    for message in body["messages"]:
        if message["role"] == "tool":
            found.append(message["content"])
        elif isinstance(message.get("content"), list):
            found += [b["content"] for b in message["content"] if b.get("type") == "tool_result"]
    return found


# ------------------------------------------------------- stall before the first token


async def test_a_stall_before_the_first_token_speaks_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    primary.script(Reply("Too late.", ttft=STALL))
    agent = make_agent(llm(backend, primary, first_token_timeout_s=DEADLINE))
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == FALLBACK and turn.completes == 1
        # The stalled stream was closed, not left to run for 30 s.
        await primary.wait_for_outcome(0, "client_disconnected", timeout=3)
        await answered_normally(call, primary)


async def test_a_stall_before_the_first_token_fails_over_to_the_next_provider(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply("Too late.", stall_after=0))
    agent = make_agent(
        llm(backend, primary, first_token_timeout_s=DEADLINE), llm(other(backend), secondary)
    )
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "The backup answers." and turn.completes == 1
        await primary.wait_for_outcome(0, "client_disconnected", timeout=3)
        assert len(secondary.requests) == 1
        await secondary.wait_for_outcome(0, "completed")
        # One missed deadline does not take the primary out of rotation.
        await answered_normally(call, primary)
        assert len(secondary.requests) == 1


async def test_a_late_first_token_gets_one_filler_then_the_next_providers_answer(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    # The filler is due long before the primary's deadline, and the backup is slow
    # too: a filler per provider (or per wait) would be heard twice.
    primary.script(Reply("Too late.", ttft=STALL))
    secondary.script(Reply("Here you go.", ttft=DEADLINE))
    agent = make_agent(
        llm(backend, primary, first_token_timeout_s=DEADLINE),
        llm(other(backend), secondary),
        first_token_filler_after_s=FILLER_AFTER,
    )
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == f"{FIRST_TOKEN_FILLER} Here you go."
        assert turn.frames[0]["content"] == FIRST_TOKEN_FILLER
        assert turn.completes == 1
        await answered_normally(call, primary)


async def test_a_filler_then_a_missed_deadline_ends_in_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    primary.script(Reply("Too late.", ttft=STALL))
    agent = make_agent(
        llm(backend, primary, first_token_timeout_s=DEADLINE),
        first_token_filler_after_s=FILLER_AFTER,
    )
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == f"{FIRST_TOKEN_FILLER} {FALLBACK}" and turn.completes == 1
        await answered_normally(call, primary)


# ------------------------------------------------------------------ stall mid-stream


async def test_a_stall_mid_stream_keeps_the_words_then_the_fallback_without_failover(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply(["We open ", "at eight ", "and close at six."], stall_after=2))
    agent = make_agent(
        llm(backend, primary, idle_timeout_s=DEADLINE), llm(other(backend), secondary)
    )
    async with call_with(agent) as call:
        turn = await call.ask("When are you open?")
        # The caller heard the start: another provider would start the answer over.
        assert turn.text == f"We open at eight {FALLBACK}" and turn.completes == 1
        await primary.wait_for_outcome(0, "client_disconnected", timeout=3)
        assert secondary.requests == []
        await answered_normally(call, primary)


# ------------------------------------------------------------------------ HTTP errors


@pytest.mark.parametrize("status", [429, 500])
async def test_an_http_error_without_retries_speaks_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer, status: int
) -> None:
    primary.script(Reply(status=status))
    async with call_with(make_agent(llm(backend, primary))) as call:
        turn = await call.ask("Hello?")
        assert turn.text == FALLBACK and turn.completes == 1
        assert len(primary.requests) == 1  # max_retries=0: the SDK did not retry
        await answered_normally(call, primary)


@pytest.mark.parametrize("status", [429, 500])
async def test_an_http_error_fails_over_to_the_next_provider(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer, status: int
) -> None:
    primary.script(Reply(status=status))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "The backup answers." and turn.completes == 1
        assert [r.outcome for r in primary.requests] == ["error_status"]
        await answered_normally(call, primary)


async def test_the_sdk_retries_a_429_and_the_caller_hears_only_the_answer(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    # A provider with none after it retries (one with a next provider fails over
    # instead: test_failover.py).
    primary.script(Reply(status=429), Reply("Worth the wait."))
    async with call_with(make_agent(llm(backend, primary, max_retries=1))) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "Worth the wait." and turn.completes == 1
        assert len(primary.requests) == 2
        await primary.wait_for_outcome(0, "error_status")
        await primary.wait_for_outcome(1, "completed")
        await answered_normally(call, primary)


async def test_a_rate_limit_fails_over_before_the_sdk_would_retry(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    # Retry-After is well inside the first-token deadline (GENEROUS): only the
    # retry rule, not a deadline, can send this turn to the backup.
    primary.script(Reply(status=429, retry_after=1.0))
    agent = make_agent(llm(backend, primary, max_retries=1), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "The backup answers." and turn.completes == 1
        assert [r.outcome for r in primary.requests] == ["error_status"]
        await answered_normally(call, primary)


# ------------------------------------------------- malformed output, streams left open


async def test_malformed_output_before_the_first_token_fails_over(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply("Garbled.", malformed_after=0))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "The backup answers." and turn.completes == 1
        await answered_normally(call, primary)


async def test_malformed_output_mid_stream_keeps_the_words_then_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply(["We are ", "open from ", "nine to five."], malformed_after=2))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hours?")
        assert turn.text == f"We are open from {FALLBACK}" and turn.completes == 1
        assert secondary.requests == []
        await answered_normally(call, primary)


async def test_a_finished_answer_on_a_stream_left_open_is_complete_without_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    # The provider says it has finished, then neither ends the body nor (OpenAI)
    # sends [DONE]. The idle deadline is GENEROUS: waiting for it would add the
    # fallback line to a complete answer.
    without_done = 2 if backend.name == "openai" else None
    primary.script(Reply("We open at nine.", ending_events=without_done, hold_open=True))
    async with call_with(make_agent(llm(backend, primary))) as call:
        turn = await call.ask("Hours?")
        assert turn.text == "We open at nine." and turn.completes == 1
        await primary.wait_for_outcome(0, "client_disconnected")
        await answered_normally(call, primary)


# --------------------------------------------------------- connection reset, no server


async def test_a_connection_reset_mid_stream_keeps_the_words_then_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply(["We are ", "open from ", "nine to five."], drop_after=2))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hours?")
        assert turn.text == f"We are open from {FALLBACK}" and turn.completes == 1
        assert [r.outcome for r in primary.requests] == ["dropped"]
        assert secondary.requests == []
        await answered_normally(call, primary)


async def test_a_connection_reset_before_the_first_token_speaks_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    primary.script(Reply("Never heard.", drop_after=0))
    async with call_with(make_agent(llm(backend, primary))) as call:
        turn = await call.ask("Hours?")
        assert turn.text == FALLBACK and turn.completes == 1
        await answered_normally(call, primary)


async def test_a_connection_reset_before_the_first_token_fails_over(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    primary.script(Reply("Never heard.", drop_after=0))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hours?")
        assert turn.text == "The backup answers." and turn.completes == 1
        assert [r.outcome for r in primary.requests] == ["dropped"]
        await answered_normally(call, primary)


async def test_a_provider_nobody_listens_on_speaks_the_fallback_and_the_call_goes_on(
    backend: RemoteBackend,
) -> None:
    async with call_with(make_agent(llm(backend, closed_port_url(backend)))) as call:
        for line in ("Hello?", "Anyone there?"):
            turn = await call.ask(line)
            assert turn.text == FALLBACK and turn.completes == 1


async def test_a_provider_nobody_listens_on_fails_over(
    backend: RemoteBackend, secondary: FakeLLMServer
) -> None:
    agent = make_agent(llm(backend, closed_port_url(backend)), llm(other(backend), secondary))
    async with call_with(agent) as call:
        turn = await call.ask("Hello?")
        assert turn.text == "The backup answers." and turn.completes == 1
        await answered_normally(call, secondary)


# ----------------------------------------------------------------------- slow tools


def slow_tools(log: list[str]) -> list[Tool]:
    @tool
    async def slow_lookup(record: str = "chart") -> str:
        """Looks a record up, slowly: longer than the agent's tool filler delay."""
        await asyncio.sleep(DEADLINE)
        log.append(record)
        return f"found the {record}"

    @tool(timeout_s=DEADLINE)
    async def hanging_lookup() -> str:
        """Never answers: the runner's timeout ends it."""
        await asyncio.sleep(STALL)
        return "never"

    return [slow_lookup, hanging_lookup]


async def test_a_slow_tool_gets_the_filler_once_then_the_answer(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    # Two rounds of slow tools in one turn, the second with two calls in parallel:
    # each round outlasts tool_filler_after_s, yet the filler is said once per turn.
    primary.script(
        Reply("", tool_calls=calls("slow_lookup")),
        Reply("", tool_calls=calls("slow_lookup", "slow_lookup")),
        Reply("Your chart is here."),
    )
    log: list[str] = []
    agent = make_agent(
        llm(backend, primary), tools=slow_tools(log), tool_filler_after_s=FILLER_AFTER
    )
    async with call_with(agent) as call:
        turn = await call.ask("Can you find my chart?")
        assert turn.text == f"{HOLDING} {TOOL_FILLER} Your chart is here."
        assert turn.completes == 1
        assert log == ["chart"] * 3
        results = of_type(call, "tool_call_result")
        assert [r["successful"] for r in results] == [True] * 3
        await answered_normally(call, primary)


async def test_a_tool_past_its_timeout_gives_the_model_an_error_and_the_caller_its_follow_up(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    primary.script(
        Reply("", tool_calls=calls("hanging_lookup")),
        Reply("That system is slow today, sorry."),
    )
    agent = make_agent(
        llm(backend, primary), tools=slow_tools([]), tool_filler_after_s=FILLER_AFTER
    )
    async with call_with(agent) as call:
        turn = await call.ask("Can you find my chart?")
        assert turn.text == f"{HOLDING} {TOOL_FILLER} That system is slow today, sorry."
        assert turn.completes == 1
        [result] = of_type(call, "tool_call_result")
        assert result["successful"] is False and "did not finish" in result["content"]
        # The model read the error; the caller only heard the model.
        assert tool_outputs(primary.requests[1].body) == [result["content"]]
        assert "did not finish" not in turn.text and "Error" not in turn.text
        await answered_normally(call, primary)


async def test_a_provider_error_after_a_tool_round_ends_in_the_fallback(
    backend: RemoteBackend, primary: FakeLLMServer
) -> None:
    primary.script(Reply("", tool_calls=calls("slow_lookup")), Reply(status=500))
    async with call_with(make_agent(llm(backend, primary), tools=slow_tools([]))) as call:
        turn = await call.ask("Can you find my chart?")
        assert turn.text == f"{HOLDING} {FALLBACK}" and turn.completes == 1
        await answered_normally(call, primary)


async def test_a_provider_error_after_a_tool_round_fails_over_with_the_tool_history(
    backend: RemoteBackend, primary: FakeLLMServer, secondary: FakeLLMServer
) -> None:
    # The completion after the tool round is a new request that has said nothing
    # yet, so it may go to the backup: nothing would be heard twice. The backup
    # gets the call and its result in its own wire format.
    primary.script(Reply("", tool_calls=calls("slow_lookup")), Reply(status=500))
    agent = make_agent(llm(backend, primary), llm(other(backend), secondary), tools=slow_tools([]))
    async with call_with(agent) as call:
        turn = await call.ask("Can you find my chart?")
        assert turn.text == f"{HOLDING} The backup answers." and turn.completes == 1
        [result] = of_type(call, "tool_call_result")
        [asked] = secondary.requests
        assert tool_outputs(asked.body) == [result["content"]] == ["found the chart"]
        assert "Error" not in json.dumps(turn.frames)
        await answered_normally(call, primary)
