"""Tool calling in the OpenAI wire format: the real SDK through ``OpenAILLM``
against ``FakeOpenAIServer``, plus the fake's own tool-call bytes, so that a
mistake on one side cannot be hidden by the same mistake on the other."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from conftest import MakeLLM
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from support import (
    BACKENDS,
    REQUEST,
    RemoteBackend,
    collect,
    has_null,
    in_module_loop,
    openai_tools,
)

from callbrain.llm import (
    ChatRequest,
    LLMTimeoutError,
    Message,
    TextDelta,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Usage,
)
from callbrain.testing.fake_llm import FakeLLMServer, FakeToolCall, Reply

BOOK = FakeToolCall("book_table", {"party": 2, "time": "19:00"})
BOOK_ARGS = '{"party":2,"time":"19:00"}'

TOOLS = (
    ToolSpec(
        "book_table",
        "Book a table.",
        {
            "type": "object",
            "properties": {"party": {"type": "integer"}, "time": {"type": "string"}},
            "required": ["party"],
        },
    ),
    ToolSpec("weather", "Today's weather."),
)

CONVERSATION = ChatRequest(
    system="You book tables.",
    messages=(
        Message("user", "A table for two at seven. And is it raining?"),
        Message(
            "assistant",
            "One moment.",
            tool_calls=(
                ToolCall("call_a", "book_table", BOOK_ARGS),
                ToolCall("call_b", "weather", "{}"),
            ),
        ),
        ToolOutput("call_a", "book_table", '{"booked":true}'),
        ToolOutput("call_b", "weather", "service unavailable", is_error=True),
        Message("assistant", "", tool_calls=(ToolCall("call_c", "weather", "{}"),)),
        ToolOutput("call_c", "weather", "Error: still down", is_error=True),
        Message("assistant", "You're booked; I can't see the weather."),
        Message("user", "Thanks."),
    ),
    tools=TOOLS,
)


@pytest.fixture(scope="module")
def backend() -> RemoteBackend:
    return BACKENDS["openai"]


def sse_payloads(raw: str) -> list[Any]:
    """The JSON payloads of an OpenAI SSE body, ``[DONE]`` checked and dropped."""
    events = raw.removesuffix("\n\n").split("\n\n")
    assert events[-1] == "data: [DONE]"
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


# -- the backend, through the SDK ------------------------------------------------


@in_module_loop
async def test_single_tool_call(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    fake.script(Reply(text="", tool_calls=[BOOK], usage=(30, 9)))
    chunks = await collect(make_llm())
    assert chunks == [ToolCall("call_fake0_0", "book_table", BOOK_ARGS), Usage(30, 9)]


@in_module_loop
async def test_parallel_calls_keep_order_ids_and_arguments(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    weather = FakeToolCall("weather", {"city": "Lyon", "days": [1, 2, 3]}, id="call_XyZ123")
    fake.script(Reply(text="", tool_calls=[BOOK, weather]))
    chunks = await collect(make_llm())
    assert chunks == [
        ToolCall("call_fake0_0", "book_table", BOOK_ARGS),
        ToolCall("call_XyZ123", "weather", '{"city":"Lyon","days":[1,2,3]}'),
        Usage(12, 7),
    ]


@in_module_loop
async def test_text_comes_first_then_the_tool_call(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    fake.script(Reply(text=["Let me ", "book that."], tool_calls=[BOOK]))
    chunks = await collect(make_llm())
    assert chunks == [
        TextDelta("Let me "),
        TextDelta("book that."),
        ToolCall("call_fake0_0", "book_table", BOOK_ARGS),
        Usage(12, 7),
    ]


@in_module_loop
async def test_text_is_not_held_back_until_the_tool_call_completes(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # The stream stalls before the call: text must reach the caller anyway, or
    # it would sit in silence while the model writes arguments.
    fake.script(Reply(text=["Let me ", "check."], tool_calls=[BOOK], stall_after=2))
    async with make_llm(first_token_timeout_s=5, idle_timeout_s=5).chat(REQUEST) as stream:
        assert await anext(stream) == TextDelta("Let me ")
        assert await anext(stream) == TextDelta("check.")
    await fake.wait_for_outcome(0, "client_disconnected")


@in_module_loop
async def test_malformed_arguments_pass_through_verbatim(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    broken = '{"party": 2, "time": "7pm"'
    fake.script(Reply(text="", tool_calls=[FakeToolCall("book_table", broken)]))
    chunks = await collect(make_llm())
    assert chunks[0] == ToolCall("call_fake0_0", "book_table", broken)


@in_module_loop
async def test_tools_are_sent_only_when_given(fake: FakeLLMServer, make_llm: MakeLLM) -> None:
    llm = make_llm()
    chunks = await collect(llm)
    await collect(llm, ChatRequest(system="", messages=(Message("user", "Hi"),), tools=TOOLS))
    assert chunks == [TextDelta("OK."), Usage(12, 7)]
    without, with_tools = (r.body for r in fake.requests)
    assert "tools" not in without
    assert with_tools["tools"] == openai_tools(
        ("book_table", "Book a table.", TOOLS[0].parameters),
        ("weather", "Today's weather.", {"type": "object", "properties": {}}),
    )
    assert not {"tool_choice", "parallel_tool_calls"} & with_tools.keys()
    assert not has_null(with_tools)


@in_module_loop
async def test_conversation_with_tool_calls_and_outputs(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    await collect(make_llm(), CONVERSATION)
    body = fake.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "You book tables."},
        {"role": "user", "content": "A table for two at seven. And is it raining?"},
        {
            "role": "assistant",
            "content": "One moment.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "book_table", "arguments": BOOK_ARGS},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"booked":true}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "Error: service unavailable"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_c",
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_c", "content": "Error: still down"},
        {"role": "assistant", "content": "You're booked; I can't see the weather."},
        {"role": "user", "content": "Thanks."},
    ]
    assert not has_null(body)


@in_module_loop
async def test_tool_only_answer_meets_the_first_token_deadline(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    fake.script(Reply(text="", tool_calls=[BOOK]))
    async with make_llm().chat(REQUEST) as stream:
        chunks = [chunk async for chunk in stream]
    assert chunks == [ToolCall("call_fake0_0", "book_table", BOOK_ARGS), Usage(12, 7)]
    assert stream.metrics.outcome == "ok"
    assert stream.metrics.tool_calls == 1
    assert stream.metrics.ttft_s is None  # no text was spoken


@in_module_loop
async def test_role_chunk_of_a_tool_only_answer_is_not_a_first_token(
    fake: FakeLLMServer, make_llm: MakeLLM
) -> None:
    # Only the ``content: null`` role chunk ever arrives: that is not an answer.
    fake.script(Reply(text="", tool_calls=[BOOK], stall_after=0))
    with pytest.raises(LLMTimeoutError, match="first token"):
        await collect(make_llm(first_token_timeout_s=0.3))
    await fake.wait_for_outcome(0, "client_disconnected")


# -- the fake's wire format -------------------------------------------------------


@in_module_loop
async def test_fake_streams_tool_calls_as_openai_fragments(fake: FakeLLMServer) -> None:
    weather = FakeToolCall("weather", {"city": "Lyon"}, id="call_given")
    fake.script(Reply(text="", tool_calls=[BOOK, weather]))
    body = {"model": "m-1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.post(f"{fake.base_url}/chat/completions", json=body)
    first, *middle, finish = sse_payloads(response.text)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert finish["choices"][0]["finish_reason"] == "tool_calls"
    fragments = [f for c in middle for f in c["choices"][0]["delta"]["tool_calls"]]
    assert all(len(c["choices"][0]["delta"]["tool_calls"]) == 1 for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    for index, (call, call_id) in enumerate([(BOOK, "call_fake0_0"), (weather, "call_given")]):
        opening, *rest = [f for f in fragments if f["index"] == index]
        assert opening == {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        assert all(f.keys() == {"index", "function"} for f in rest)
        assert len(rest) > 1, "arguments must come in pieces the client has to join"
        assert "".join(f["function"]["arguments"] for f in rest) == call.arguments_text
    # Call 0 ends before call 1 starts, as OpenAI sends them.
    assert [f["index"] for f in fragments] == sorted(f["index"] for f in fragments)
    assert fake.requests[0].chunks_sent == 2


@in_module_loop
async def test_fake_stream_with_text_keeps_empty_role_content(fake: FakeLLMServer) -> None:
    fake.script(Reply(text="Sure.", tool_calls=[BOOK]))
    body = {"model": "m-1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.post(f"{fake.base_url}/chat/completions", json=body)
    first, text, *_, finish = sse_payloads(response.text)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["choices"][0]["delta"] == {"content": "Sure."}
    assert finish["choices"][0]["finish_reason"] == "tool_calls"


@in_module_loop
async def test_fake_completion_with_tool_calls(fake: FakeLLMServer) -> None:
    fake.script(
        Reply(text="", tool_calls=[BOOK, FakeToolCall("weather", "{oops")]),
        Reply(text="On it.", tool_calls=[BOOK]),
        Reply(text="Hello."),
    )
    body = {"model": "m-1", "messages": [{"role": "user", "content": "Hi"}]}
    async with httpx2.AsyncClient(timeout=5) as http:
        answers = [
            (await http.post(f"{fake.base_url}/chat/completions", json=body)).json()
            for _ in range(3)
        ]
    tool_only, with_text, text_only = (a["choices"][0] for a in answers)
    assert tool_only["finish_reason"] == "tool_calls"
    assert tool_only["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_fake0_0",
                "type": "function",
                "function": {"name": "book_table", "arguments": BOOK_ARGS},
            },
            {
                "id": "call_fake0_1",
                "type": "function",
                "function": {"name": "weather", "arguments": "{oops"},
            },
        ],
    }
    assert with_text["finish_reason"] == "tool_calls"
    assert with_text["message"]["content"] == "On it."
    assert [c["id"] for c in with_text["message"]["tool_calls"]] == ["call_fake1_0"]
    assert text_only["finish_reason"] == "stop"
    assert text_only["message"] == {"role": "assistant", "content": "Hello.", "refusal": None}


@in_module_loop
async def test_sdk_parses_the_fake_non_streaming_completion(fake: FakeLLMServer) -> None:
    fake.script(Reply(text="", tool_calls=[BOOK]))
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="m-1", messages=[{"role": "user", "content": "Hi"}]
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_fake0_0",
        "book_table",
        BOOK_ARGS,
    )
