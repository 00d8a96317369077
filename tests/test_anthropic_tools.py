"""Tool calls in the Anthropic messages wire format, on both sides: what the
fake server streams, and how the backend (through the real SDK) sends tools,
replays calls and results, and rebuilds calls from ``input_json_delta``."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from conftest import MakeLLM
from support import BACKENDS, REQUEST, RemoteBackend, collect, in_module_loop

from callbrain.llm import (
    ChatChunk,
    ChatItem,
    ChatRequest,
    LLMError,
    LLMTimeoutError,
    Message,
    TextDelta,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Usage,
)
from callbrain.llm.anthropic import CALL_STARTED, normalize_messages
from callbrain.testing.fake_llm import FakeLLMServer, FakeToolCall, Reply

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
HANG_UP = ToolSpec("end_call", "End the call politely.")

GREETING = Message("assistant", "Hi, thanks for calling. How can I help?")
CALL_1 = ToolCall("toolu_1", "get_weather", '{"city":"Paris"}')
CALL_2 = ToolCall("toolu_2", "get_weather", '{"city":"Oslo"}')


@pytest.fixture(scope="module")
def backend() -> RemoteBackend:
    return BACKENDS["anthropic"]


def roles(messages: list[dict[str, Any]]) -> list[str]:
    return [m["role"] for m in messages]


def alternates_from_user(messages: list[dict[str, Any]]) -> bool:
    expected = ["user", "assistant"] * len(messages)
    return roles(messages) == expected[: len(messages)]


# -- the fake server's wire format ----------------------------------------------------


async def sse_data(fake: FakeLLMServer, **body: Any) -> list[dict[str, Any]]:
    """The data of every SSE event of one raw streamed request, checking that
    each ``event:`` name repeats its data's ``type``."""
    request = {"model": "m-1", "max_tokens": 5, "messages": [], "stream": True, **body}
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.post(f"{fake.base_url}/v1/messages", json=request)
    assert response.status_code == 200
    events = [event.split("\n") for event in response.text.removesuffix("\n\n").split("\n\n")]
    data = []
    for name, payload in events:
        parsed = json.loads(payload.removeprefix("data: "))
        assert name == f"event: {parsed['type']}"
        data.append(parsed)
    return data


def partial_json(data: list[dict[str, Any]], index: int) -> list[str]:
    return [
        d["delta"]["partial_json"]
        for d in data
        if d["type"] == "content_block_delta" and d["index"] == index
    ]


@in_module_loop
async def test_fake_streams_text_then_tool_use_blocks_each_closed_before_the_next(
    fake: FakeLLMServer,
) -> None:
    arguments = {"city": "Paris", "units": "celsius"}
    fake.script(Reply(["Let me", " check."], tool_calls=[FakeToolCall("get_weather", arguments)]))
    data = await sse_data(fake)
    assert [(d["type"], d.get("index")) for d in data] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("ping", None),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        *[("content_block_delta", 1)] * 3,
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert data[6]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_fake0_0",
        "name": "get_weather",
        "input": {},
    }
    fragments = partial_json(data, 1)
    assert all(data[i]["delta"]["type"] == "input_json_delta" for i in range(7, 10))
    assert json.loads("".join(fragments)) == arguments
    assert data[-2]["delta"]["stop_reason"] == "tool_use"
    assert fake.requests[0].chunks_sent == 3


@in_module_loop
async def test_fake_tool_only_reply_has_no_text_block(fake: FakeLLMServer) -> None:
    fake.script(
        Reply(
            "",
            tool_calls=[FakeToolCall("a", {"x": 1}), FakeToolCall("b", '{"y": 2}', id="toolu_b")],
        )
    )
    data = await sse_data(fake)
    starts = [d for d in data if d["type"] == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "tool_use"),
        (1, "tool_use"),
    ]
    assert [s["content_block"]["id"] for s in starts] == ["toolu_fake0_0", "toolu_b"]
    assert "".join(partial_json(data, 0)) == '{"x":1}'
    assert "".join(partial_json(data, 1)) == '{"y": 2}'
    assert [d["index"] for d in data if d["type"] == "content_block_stop"] == [0, 1]
    assert data[1]["type"] == "ping"


@in_module_loop
async def test_fake_tool_use_ids_differ_between_requests(fake: FakeLLMServer) -> None:
    fake.reset(default=Reply("", tool_calls=[FakeToolCall("a")]))
    first, second = await sse_data(fake), await sse_data(fake)
    ids = [
        d["content_block"]["id"] for d in [*first, *second] if d["type"] == "content_block_start"
    ]
    assert ids == ["toolu_fake0_0", "toolu_fake1_0"]


@in_module_loop
async def test_fake_text_only_reply_is_unchanged(fake: FakeLLMServer) -> None:
    data = await sse_data(fake)
    assert [d["type"] for d in data] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert data[-2]["delta"]["stop_reason"] == "end_turn"


@in_module_loop
async def test_fake_non_streaming_message_parses_with_the_sdk(fake: FakeLLMServer) -> None:
    fake.script(
        Reply(
            "Checking.",
            tool_calls=[
                FakeToolCall("get_weather", {"city": "Paris"}),
                FakeToolCall("get_weather", '{"city": "Os', id="toolu_x"),
            ],
        )
    )
    async with anthropic.AsyncAnthropic(api_key="k", base_url=fake.base_url) as client:
        message = await client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
        )
    assert message.stop_reason == "tool_use"
    text, first, second = message.content
    assert text.type == "text" and text.text == "Checking."
    assert first.type == "tool_use" and second.type == "tool_use"
    assert (first.id, first.name, first.input) == (
        "toolu_fake0_0",
        "get_weather",
        {"city": "Paris"},
    )
    # Malformed scripted arguments cannot be an object in a complete message.
    assert (second.id, second.input) == ("toolu_x", {})


# -- streamed calls through the backend -----------------------------------------------


@in_module_loop
async def test_one_tool_call(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    fake.script(
        Reply("", tool_calls=[FakeToolCall("get_weather", {"city": "Paris"})], usage=(5, 3))
    )
    chunks = await collect(make_llm())
    assert chunks == [ToolCall("toolu_fake0_0", "get_weather", '{"city":"Paris"}'), Usage(5, 3)]


@in_module_loop
async def test_two_tool_use_blocks_in_one_message(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    paris = {"city": "Paris", "note": "unicode: café ☂"}
    fake.script(
        Reply(
            "",
            tool_calls=[
                FakeToolCall("get_weather", paris, id="toolu_paris"),
                FakeToolCall("end_call"),
            ],
        )
    )
    chunks = await collect(make_llm())
    calls = [c for c in chunks if isinstance(c, ToolCall)]
    assert [(c.id, c.name) for c in calls] == [
        ("toolu_paris", "get_weather"),
        ("toolu_fake0_1", "end_call"),
    ]
    assert json.loads(calls[0].arguments) == paris
    assert calls[1].arguments == "{}"


@in_module_loop
async def test_text_then_a_tool_call_keeps_their_order(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(
        Reply(["One", " moment."], tool_calls=[FakeToolCall("get_weather", {"city": "Oslo"})])
    )
    chunks = await collect(make_llm())
    assert chunks[:3] == [
        TextDelta("One"),
        TextDelta(" moment."),
        ToolCall("toolu_fake0_0", "get_weather", '{"city":"Oslo"}'),
    ]
    assert isinstance(chunks[3], Usage) and len(chunks) == 4


@in_module_loop
async def test_malformed_arguments_pass_through_verbatim(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    broken = '{"city": "Par'
    fake.script(Reply("", tool_calls=[FakeToolCall("get_weather", broken)]))
    chunks = await collect(make_llm())
    assert ToolCall("toolu_fake0_0", "get_weather", broken) in chunks


@in_module_loop
async def test_call_without_arguments_gets_an_empty_object(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply("", tool_calls=[FakeToolCall("end_call", "")]))
    chunks = await collect(make_llm())
    assert ToolCall("toolu_fake0_0", "end_call", "{}") in chunks


@in_module_loop
async def test_a_tool_only_reply_meets_the_first_token_deadline(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # Stalling right after the call: the call must come out on its own block's
    # stop (not at message end), and count as the first token, so what times
    # out afterwards is the idle deadline, not the first-token one.
    fake.script(Reply("", tool_calls=[FakeToolCall("end_call")], stall_after=1))
    received: list[ChatChunk] = []
    llm = make_llm(first_token_timeout_s=10, idle_timeout_s=0.3)
    with pytest.raises(LLMTimeoutError, match="next chunk"):
        async with llm.chat(REQUEST) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert received == [ToolCall("toolu_fake0_0", "end_call", "{}")]
    assert stream.metrics.tool_calls == 1
    await fake.wait_for_outcome(0, "client_disconnected", timeout=2.0)


@in_module_loop
async def test_a_dropped_stream_yields_only_complete_calls(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(
        Reply("", tool_calls=[FakeToolCall("a", {"n": 1}), FakeToolCall("b")], drop_after=1)
    )
    received: list[ChatChunk] = []
    with pytest.raises(LLMError) as caught:
        async with make_llm().chat(REQUEST) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert received == [ToolCall("toolu_fake0_0", "a", '{"n":1}')]
    assert caught.value.retryable


# -- the request body -----------------------------------------------------------------


@in_module_loop
async def test_tools_are_sent_only_when_given(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    llm = make_llm()
    await collect(llm)
    await collect(llm, ChatRequest(REQUEST.system, REQUEST.messages, (WEATHER, HANG_UP)))
    without, with_tools = (r.body for r in fake.requests)
    assert "tools" not in without
    assert with_tools["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "input_schema": WEATHER.parameters,
        },
        {
            "name": "end_call",
            "description": "End the call politely.",
            "input_schema": {"type": "object", "properties": {}},
        },
    ]
    assert without["messages"] == with_tools["messages"]


@in_module_loop
async def test_conversation_with_calls_and_outputs_maps_to_blocks(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    conversation: tuple[ChatItem, ...] = (
        GREETING,
        Message("user", "Weather in Paris and Oslo?"),
        Message("assistant", "Let me check. ", (CALL_1, CALL_2)),
        ToolOutput("toolu_1", "get_weather", "Sunny, 21°C"),
        ToolOutput("toolu_2", "get_weather", "Weather service down", is_error=True),
        Message("user", "Take your time."),
        Message("assistant", "Paris is sunny; Oslo I could not get."),
        Message("user", "Thanks, bye."),
        # Arguments that are not a JSON object cannot be an ``input``.
        Message(
            "assistant",
            "",
            (ToolCall("toolu_3", "end_call", "not json"), ToolCall("toolu_4", "end_call", "[1]")),
        ),
        ToolOutput("toolu_3", "end_call", ""),
        ToolOutput("toolu_4", "end_call", " \n"),
    )
    await collect(make_llm(), ChatRequest("Be brief.", conversation, (WEATHER, HANG_UP)))
    messages = fake.requests[0].body["messages"]
    assert messages == [
        {"role": "user", "content": CALL_STARTED},
        {"role": "assistant", "content": GREETING.content},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21°C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "Weather service down",
                    "is_error": True,
                },
                {"type": "text", "text": "Take your time."},
            ],
        },
        {"role": "assistant", "content": "Paris is sunny; Oslo I could not get."},
        {"role": "user", "content": "Thanks, bye."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_3", "name": "end_call", "input": {}},
                {"type": "tool_use", "id": "toolu_4", "name": "end_call", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_3"},
                {"type": "tool_result", "tool_use_id": "toolu_4"},
            ],
        },
    ]
    assert alternates_from_user(messages)


@in_module_loop
async def test_a_call_before_any_user_turn_still_starts_with_the_user(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # The agent may look the caller up before greeting: the very first turn is a call.
    lookup = ToolCall("toolu_0", "lookup_caller", '{"phone":"+15550100"}')
    conversation: tuple[ChatItem, ...] = (
        Message("assistant", "", (lookup,)),
        ToolOutput("toolu_0", "lookup_caller", '{"name":"Ada"}'),
        Message("assistant", "Hi Ada, how can I help?"),
        Message("user", "Book a table."),
    )
    await collect(make_llm(), ChatRequest("", conversation))
    messages = fake.requests[0].body["messages"]
    assert alternates_from_user(messages)
    assert messages[0] == {"role": "user", "content": CALL_STARTED}
    assert messages[1]["content"][0]["type"] == "tool_use"
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_0", "content": '{"name":"Ada"}'}
    ]
    assert messages[3] == {"role": "assistant", "content": "Hi Ada, how can I help?"}


# -- normalisation with tool items ----------------------------------------------------


def test_normalize_prepends_a_user_turn_before_a_greeting_with_calls() -> None:
    conversation: list[ChatItem] = [
        GREETING,
        Message("user", "Weather?"),
        Message("assistant", "", (CALL_1,)),
        ToolOutput("toolu_1", "get_weather", "Sunny"),
        Message("assistant", "It is sunny.  "),
    ]
    assert normalize_messages(conversation) == [
        Message("user", CALL_STARTED),
        *conversation[:4],
        Message("assistant", "It is sunny."),
    ]


def test_normalize_merges_text_into_the_call_turn_before_its_calls() -> None:
    conversation: list[ChatItem] = [
        Message("user", "Weather?"),
        Message("assistant", "Sure."),
        Message("assistant", " ", ()),
        Message("assistant", "Checking.", (CALL_1, CALL_2)),
        ToolOutput("toolu_1", "get_weather", "Sunny"),
        ToolOutput("toolu_2", "get_weather", "Rain"),
    ]
    assert normalize_messages(conversation) == [
        Message("user", "Weather?"),
        Message("assistant", "Sure.\nChecking.", (CALL_1, CALL_2)),
        ToolOutput("toolu_1", "get_weather", "Sunny"),
        ToolOutput("toolu_2", "get_weather", "Rain"),
    ]


def test_normalize_puts_user_text_after_the_outputs_it_follows() -> None:
    outputs = [
        ToolOutput("toolu_1", "get_weather", "Sunny"),
        ToolOutput("toolu_2", "get_weather", "", is_error=True),
    ]
    conversation: list[ChatItem] = [
        Message("user", "Weather?"),
        Message("assistant", "", (CALL_1, CALL_2)),
        *outputs,
        Message("user", "  "),
        Message("user", "Hello?"),
        Message("user", "Still there?"),
    ]
    assert normalize_messages(conversation) == [
        *conversation[:2],
        *outputs,
        Message("user", "Hello?\nStill there?"),
    ]


def test_normalize_keeps_outputs_even_when_their_content_is_empty() -> None:
    conversation: list[ChatItem] = [
        Message("user", "Bye."),
        Message("assistant", "", (CALL_1,)),
        ToolOutput("toolu_1", "get_weather", ""),
    ]
    assert normalize_messages(conversation) == conversation


def test_normalize_keeps_pairs_adjacent_across_several_rounds() -> None:
    conversation: list[ChatItem] = [
        Message("assistant", "", (CALL_1,)),
        ToolOutput("toolu_1", "get_weather", "Sunny"),
        Message("assistant", "", (CALL_2,)),
        ToolOutput("toolu_2", "get_weather", "Rain"),
    ]
    assert normalize_messages(conversation) == [Message("user", CALL_STARTED), *conversation]
