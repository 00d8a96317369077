"""How a provider's stream ends, and what counts as a provider fault: the real
SDKs against fake servers that misbehave in the two wire formats.

* The answer ends when the provider says so (OpenAI's ``finish_reason`` /
  ``[DONE]``, Anthropic's ``message_stop``), not when the socket closes: a
  server that finishes but keeps the connection open must not hold the turn
  until the idle deadline (which would add the fallback line to a complete
  answer). Usage sent promptly after the finish is kept.
* Output that cannot be parsed (an event cut off mid-JSON) is a retryable
  fault, like a dropped connection, so a failover can move a turn that has not
  spoken yet; an Anthropic stream that ends without ``message_stop`` is one too.

Every deadline here is generous (seconds), so a test that passes cannot have
passed by timing out, and none asserts how long anything took.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import MakeLLM
from support import BACKENDS, REQUEST, RemoteBackend, collect, in_module_loop

from callbrain.llm import LLM, ChatChunk, LLMError, LLMTimeoutError, TextDelta, ToolCall, Usage
from callbrain.llm.failover import FailoverLLM
from callbrain.testing.fake_llm import FakeLLMServer, FakeToolCall, Reply

pytestmark = in_module_loop

GENEROUS = 5.0
"""First-token and idle deadlines: a turn that waits for them has failed the test."""


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> RemoteBackend:
    return BACKENDS[request.param]


def patient(make_llm: MakeLLM, **options: Any) -> Any:
    return make_llm(first_token_timeout_s=GENEROUS, idle_timeout_s=GENEROUS, **options)


async def read_all(llm: LLM) -> tuple[list[ChatChunk], LLMError | None]:
    """Every chunk the stream gave, and the error that ended it, if any."""
    received: list[ChatChunk] = []
    try:
        async with llm.chat(REQUEST) as stream:
            async for chunk in stream:
                received.append(chunk)
    except LLMError as exc:
        return received, exc
    return received, None


# ------------------------------------------------------------- finished, never closed


async def test_a_finished_stream_that_stays_open_ends_at_the_providers_last_event(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["All", " done."], usage=(21, 2), hold_open=True))
    chunks = await collect(patient(make_llm))
    assert chunks == [TextDelta("All"), TextDelta(" done."), Usage(21, 2)]
    # We hung up on it; it never ended the body itself.
    await fake.wait_for_outcome(0, "client_disconnected")


async def test_tool_calls_of_a_finished_stream_that_stays_open_are_all_delivered(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    call = FakeToolCall("lookup", {"day": "monday"}, id="call_1")
    fake.script(Reply("One moment.", tool_calls=[call], hold_open=True))
    chunks = await collect(patient(make_llm))
    assert [c for c in chunks if isinstance(c, ToolCall)] == [
        ToolCall("call_1", "lookup", '{"day":"monday"}')
    ]
    await fake.wait_for_outcome(0, "client_disconnected")


@pytest.mark.parametrize("backend", ["openai"], indirect=True)
async def test_openai_usage_after_the_finish_is_kept_without_done(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # finish_reason chunk, usage chunk, then neither [DONE] nor the end of the body.
    fake.script(Reply(["Sure."], usage=(30, 4), ending_events=2, hold_open=True))
    chunks = await collect(patient(make_llm))
    assert chunks == [TextDelta("Sure."), Usage(30, 4)]
    await fake.wait_for_outcome(0, "client_disconnected")


@pytest.mark.parametrize("backend", ["openai"], indirect=True)
async def test_openai_finish_reason_alone_ends_the_answer_within_the_grace(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # A server that ignores include_usage and never sends [DONE]: the answer is
    # complete at finish_reason; we wait a short grace for usage, then hang up.
    fake.script(Reply(["Sure", " thing."], ending_events=1, hold_open=True))
    chunks = await collect(patient(make_llm))
    assert chunks == [TextDelta("Sure"), TextDelta(" thing.")]
    await fake.wait_for_outcome(0, "client_disconnected")


@pytest.mark.parametrize("backend", ["anthropic"], indirect=True)
async def test_anthropic_stream_that_ends_without_message_stop_is_a_retryable_error(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # The body ends cleanly after content_block_stop: the answer may be cut short.
    fake.script(Reply(["We open", " at nine."], ending_events=1))
    received, error = await read_all(patient(make_llm))
    assert received == [TextDelta("We open"), TextDelta(" at nine.")]
    assert error is not None and error.retryable and not isinstance(error, LLMTimeoutError)
    assert "message_stop" in str(error)


async def test_the_connection_is_reused_after_a_well_behaved_stream(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # Ending at the provider's last event must not cost a new connection per turn.
    llm = patient(make_llm)
    for _ in range(3):
        await collect(llm)
    assert len({r.client for r in fake.requests}) == 1
    assert [r.outcome for r in fake.requests] == ["completed"] * 3


# -------------------------------------------------------------------- malformed output


async def test_malformed_output_before_the_first_token_is_a_retryable_error(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("Never heard.", malformed_after=0))
    received, error = await read_all(patient(make_llm))
    assert received == []
    assert error is not None and error.retryable and not isinstance(error, LLMTimeoutError)
    assert "malformed" in str(error)


async def test_malformed_output_mid_stream_is_a_retryable_error_after_the_words(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(["We open", " at nine."], malformed_after=1))
    received, error = await read_all(patient(make_llm))
    assert received == [TextDelta("We open")]
    assert error is not None and error.retryable and "malformed" in str(error)


async def test_malformed_output_before_the_first_token_fails_over(
    backend: RemoteBackend, fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # The same fake answers both members: garbage first, then a good answer.
    fake.script(Reply("Garbled.", malformed_after=0), Reply(["Clean answer."]))
    llm = FailoverLLM([patient(make_llm), patient(make_llm)])
    async with llm.chat(REQUEST) as stream:
        chunks = [chunk async for chunk in stream]
    assert [c for c in chunks if isinstance(c, TextDelta)] == [TextDelta("Clean answer.")]
    [failover] = stream.metrics.failovers
    assert failover.startswith(f"{backend.name}/") and "malformed" in failover
    assert stream.metrics.outcome == "ok"
