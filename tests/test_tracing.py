"""OpenTelemetry traces of real calls, caught with the SDK's in-memory exporter: the
span tree, its names, parents, times and GenAI attributes, and no call content
unless the agent file allows it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from observing import serve
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import callbrain.observe
from callbrain.agent import Agent
from callbrain.extras import MissingExtraError
from callbrain.llm.config import OpenAIConfig
from callbrain.server.app import create_app
from callbrain.server.settings import ServerSettings
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply
from callbrain.tools import tool

CALLER = "Anything free on Friday?"
ANSWER = "Friday at nine is free."


@tool
def check_availability(day: str) -> dict[str, Any]:
    """Free appointment times on a day.

    Args:
        day: The day, e.g. "friday".
    """
    return {"day": day, "free": ["09:00"]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def make_agent(fake: FakeOpenAIServer | None = None, **tracing: Any) -> Agent:
    base_url = fake.base_url if fake is not None else "http://127.0.0.1:9/v1"
    llm = OpenAIConfig(
        provider="openai", model="test-model", base_url=base_url, api_key="k", max_retries=0
    )
    settings = {"tracing": {"enabled": True, "exporter": "none", **tracing}}
    return Agent(
        name="traced",
        begin_message="Hello.",
        holding_messages=["One moment."],
        tool_filler_after_s=None,
        llm=llm,
        tools=[check_availability],
        server=ServerSettings.model_validate(settings),
    )


async def traced_call(fake: FakeOpenAIServer, **tracing: Any) -> list[ReadableSpan]:
    """One call with a tool turn, served with tracing on; the spans it made."""
    fake.script(
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "friday"})]),
        Reply(ANSWER),
    )
    exporter = InMemorySpanExporter()
    async with serve(make_agent(fake, **tracing)) as served:
        provider = served.app.state.telemetry.tracer_provider
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
            assert (await call.ask(CALLER)).text == f"One moment. {ANSWER}"
            await call.send("{not json")
        await served.probe.wait(1)
    return list(exporter.get_finished_spans())


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def within(inner: ReadableSpan, outer: ReadableSpan) -> bool:
    assert inner.start_time and inner.end_time and outer.start_time and outer.end_time
    return outer.start_time <= inner.start_time <= inner.end_time <= outer.end_time


async def test_a_call_is_a_tree_of_call_turn_chat_and_tool_spans(fake: FakeOpenAIServer) -> None:
    spans = await traced_call(fake)
    [call] = named(spans, "call")
    assert call.parent is None and call.kind == SpanKind.SERVER
    assert call.attributes is not None
    assert call.attributes["callbrain.call.id"] == "call-1"
    assert call.attributes["gen_ai.conversation.id"] == "call-1"
    assert call.attributes["gen_ai.agent.name"] == "traced"
    assert call.attributes["callbrain.call.end"] in ("hangup", "drop")
    assert [event.name for event in call.events] == ["frame_ignored"]
    assert call.resource.attributes["service.name"] == "callbrain"

    turns = named(spans, "turn")
    assert {parent_of(t) for t in turns} == {call.context.span_id}
    begin, response = sorted(turns, key=lambda t: t.attributes["callbrain.turn.response_id"])
    assert begin.attributes == {
        "callbrain.turn.response_id": 0,
        "callbrain.turn.kind": "begin",
        "callbrain.turn.outcome": "completed",
    }
    assert response.attributes is not None
    assert response.attributes["callbrain.turn.outcome"] == "completed"
    # The answer was started from the caller's update_only, before the request came
    # (speculation, on by default): the request's arrival is an event in the turn.
    assert response.attributes is not None
    assert response.attributes["callbrain.turn.speculation"] == "hit"
    assert [event.name for event in response.events] == ["request", "first_frame"]

    chats = sorted(named(spans, "chat test-model"), key=lambda s: s.start_time or 0)
    [tool] = named(spans, "execute_tool check_availability")
    assert len(chats) == 2 and len(spans) == 6  # call, 2 turns, 2 chats, 1 tool
    for chat in chats:
        assert parent_of(chat) == response.context.span_id
        assert chat.kind == SpanKind.CLIENT
        assert chat.attributes is not None
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.system"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == "test-model"
        assert chat.attributes["gen_ai.usage.input_tokens"] == 12
        assert chat.attributes["gen_ai.usage.output_tokens"] == 7
        assert chat.status.status_code == StatusCode.UNSET
    assert parent_of(tool) == response.context.span_id
    assert tool.kind == SpanKind.INTERNAL
    assert tool.attributes == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "check_availability",
        "gen_ai.tool.type": "function",
        "callbrain.tool.outcome": "ok",
    }
    # One trace, and the times nest and follow each other as the turn went.
    assert {span.context.trace_id for span in spans} == {call.context.trace_id}
    assert all(within(span, response) for span in [*chats, tool])
    assert within(response, call) and within(begin, call)
    assert chats[0].end_time <= tool.start_time and tool.end_time <= chats[1].start_time


async def test_no_call_content_on_spans_by_default(fake: FakeOpenAIServer) -> None:
    spans = await traced_call(fake)
    values = [str(v) for span in spans for v in (span.attributes or {}).values()]
    values += [str(v) for span in spans for e in span.events for v in (e.attributes or {}).values()]
    assert not any(text in value for value in values for text in (CALLER, ANSWER, "friday"))


async def test_capture_text_puts_what_was_said_on_the_spans(fake: FakeOpenAIServer) -> None:
    spans = await traced_call(fake, capture_text=True)
    [response] = [
        s for s in named(spans, "turn") if s.attributes["callbrain.turn.kind"] == "response"
    ]
    assert response.attributes is not None
    assert response.attributes["callbrain.turn.caller_text"] == CALLER
    assert response.attributes["callbrain.turn.spoken"] == f"One moment. {ANSWER}"
    [tool] = named(spans, "execute_tool check_availability")
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.call.arguments"] == '{"day":"friday"}'
    assert "09:00" in str(tool.attributes["gen_ai.tool.call.result"])


async def test_a_failing_model_marks_its_span_and_the_turn(fake: FakeOpenAIServer) -> None:
    fake.script(Reply(status=500))
    exporter = InMemorySpanExporter()
    async with serve(make_agent(fake)) as served:
        served.app.state.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hi")
        await served.probe.wait(1)
    spans = exporter.get_finished_spans()
    [chat] = [s for s in spans if s.name == "chat test-model"]
    assert chat.status.status_code == StatusCode.ERROR
    assert chat.attributes is not None and chat.attributes["error.type"] == "error:500"
    [turn] = [
        s for s in spans if s.name == "turn" and s.attributes["callbrain.turn.kind"] == "response"
    ]
    assert turn.status.status_code == StatusCode.ERROR
    assert turn.attributes is not None and turn.attributes["callbrain.turn.outcome"] == "fallback"


# -------------------------------------------------------------- missing extra


@pytest.fixture
def without_otel_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if the ``otel`` extra were not installed (None in sys.modules fails the import)."""
    for name in [n for n in sys.modules if n.startswith("opentelemetry.sdk")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    # Imported afresh: from the package attribute too, which an earlier import left.
    monkeypatch.delitem(sys.modules, "callbrain.observe.tracing", raising=False)
    monkeypatch.delattr(callbrain.observe, "tracing", raising=False)
    yield


@pytest.mark.usefixtures("without_otel_sdk")
def test_tracing_without_the_extra_fails_at_start_up_in_one_line() -> None:
    with pytest.raises(MissingExtraError) as info:
        create_app(make_agent())
    assert str(info.value) == "server.tracing needs the 'otel' extra: pip install 'callbrain[otel]'"


def test_the_otlp_exporter_must_be_installed_to_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(
        MissingExtraError, match="pip install opentelemetry-exporter-otlp-proto-http"
    ):
        create_app(make_agent(exporter="otlp"))


def test_serve_names_the_missing_extra_without_a_traceback(tmp_path: Path) -> None:
    # A stand-in opentelemetry.sdk that cannot be imported, first on the path.
    shadow = tmp_path / "shadow" / "opentelemetry" / "sdk"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "name: x\nllm: {provider: openai, api_key: k, base_url: 'http://127.0.0.1:9/v1'}\n"
        "server: {tracing: {enabled: true}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow"), "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "callbrain", "serve", "--agent", str(agent), "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "server.tracing needs the 'otel' extra: pip install 'callbrain[otel]'" in result.stderr
