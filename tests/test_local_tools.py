"""Tool calls in LocalLLM, against the real SmolLM2-135M (and llama.cpp's chat code).

SmolLM2's own chat template cannot do tools, so two models are loaded: the
shipped one as is, and the same weights with a Hermes-style template (the
ChatML-with-``<tool_call>`` format Qwen2.5 uses; SmolLM2 speaks ChatML) that
llama.cpp recognises as tool-capable. The model is far too weak to choose tools
well, so the tests assert on the shape of what comes back, never on its content.
A few stream-assembly cases (ids, interleaving, truncation) need exact chunks,
so they replay chunks shaped like the ones llama.cpp streamed in a real run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from support import openai_tools

from callbrain.llm import (
    ChatChunk,
    ChatItem,
    ChatRequest,
    LLMError,
    LocalConfig,
    Message,
    TextDelta,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Usage,
    local,
)
from callbrain.llm.chat import keep_newest
from callbrain.llm.local import LocalLLM

# Every tag trims the whitespace before it, so only the quoted text is output.
HERMES_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}
{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
{%- if message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls %}
{{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' }}
{{- call.function.arguments | tojson }}{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif not (loop.first and message.role == 'system') %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

TOOLS = (
    ToolSpec(
        "book_visit",
        "Book a dental visit.",
        {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
    ),
    ToolSpec("end_call", "Hang up."),
)
SYSTEM = "You book dental visits."

# Earlier turns in every shape the mapping must handle: a call with arguments,
# one without (llama.cpp streams those as empty text), one whose arguments are
# not JSON, an output that is an error.
HISTORY: tuple[ChatItem, ...] = (
    Message("user", "Book me in on Tuesday, then hang up."),
    Message(
        "assistant",
        "One moment.",
        (
            ToolCall("h1", "book_visit", '{"day": "Tuesday"}'),
            ToolCall("h2", "end_call", ""),
            ToolCall("h3", "book_visit", '{"day": "Tue",'),
        ),
    ),
    ToolOutput("h1", "book_visit", "Booked: Tuesday 9 a.m."),
    ToolOutput("h2", "end_call", "not now", is_error=True),
    ToolOutput("h3", "book_visit", "Error: arguments are not valid JSON", is_error=True),
    Message("assistant", "You're booked for Tuesday at nine."),
    Message("user", "Thanks. Can you book Wednesday too?"),
)


def model_config(**overrides: Any) -> LocalConfig:
    # One slot, so greedy decoding is never batched with another call's tokens.
    settings: dict[str, Any] = {
        "provider": "local",
        "n_ctx": 2048,
        "n_parallel": 1,
        "n_threads": 1,
        "temperature": 0,
        "max_tokens": 24,
        "first_token_timeout_s": 60,
        # The shapes of calls and text are under test here, not how a reply ends.
        "whole_sentences": False,
    }
    return LocalConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def smollm() -> Iterator[LocalLLM]:
    """The shipped model with its own template, which has no tools."""
    model = LocalLLM(model_config())
    asyncio.run(model.warmup())
    yield model
    asyncio.run(model.aclose())


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLLM]:
    """The same weights with a tool-capable template, given as a file."""
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE, encoding="utf-8")
    model = LocalLLM(model_config(chat_template=str(template)))
    asyncio.run(model.warmup())
    yield model
    asyncio.run(model.aclose())


async def collect(llm: LocalLLM, request: ChatRequest) -> list[ChatChunk]:
    async with llm.chat(request) as stream:
        chunks = [chunk async for chunk in stream]
    assert stream.metrics.outcome == "ok"
    return chunks


def assert_clean_end(chunks: list[ChatChunk], request: ChatRequest) -> list[ToolCall]:
    """Text and/or whole calls to known tools with fresh ids, then usage; the calls."""
    assert chunks and isinstance(chunks[-1], Usage)
    assert all(isinstance(c, TextDelta | ToolCall) for c in chunks[:-1])
    calls = [c for c in chunks if isinstance(c, ToolCall)]
    earlier = {c.id for m in request.messages if isinstance(m, Message) for c in m.tool_calls}
    ids = [call.id for call in calls]
    assert all(ids) and len(set(ids)) == len(ids) and not earlier & set(ids)
    for call in calls:
        assert call.name in {tool.name for tool in request.tools}
        assert isinstance(json.loads(call.arguments or "{}"), dict)
    return calls


# --- the request body ---------------------------------------------------------


def test_tools_are_sent_in_openai_form_only_when_the_request_has_some() -> None:
    llm = LocalLLM(LocalConfig(provider="local"))
    plain = llm._body(ChatRequest(SYSTEM, (Message("user", "Hi"),)))
    with_tools = llm._body(ChatRequest(SYSTEM, (Message("user", "Hi"),), TOOLS))

    assert "tools" not in plain
    assert with_tools["tools"] == openai_tools(
        ("book_visit", "Book a dental visit.", TOOLS[0].parameters),
        ("end_call", "Hang up.", {"type": "object", "properties": {}}),
    )
    asyncio.run(llm.aclose())


def test_tool_calls_and_outputs_map_to_openai_messages() -> None:
    llm = LocalLLM(LocalConfig(provider="local"))
    messages = llm._body(ChatRequest(SYSTEM, HISTORY, TOOLS))["messages"]

    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "tool",
        "assistant",
        "user",
    ]
    assert messages[2] == {
        "role": "assistant",
        "content": "One moment.",
        "tool_calls": [
            {
                "id": "h1",
                "type": "function",
                "function": {"name": "book_visit", "arguments": '{"day": "Tuesday"}'},
            },
            # Sent as an object: llama.cpp would reject the request over either.
            {"id": "h2", "type": "function", "function": {"name": "end_call", "arguments": "{}"}},
            {"id": "h3", "type": "function", "function": {"name": "book_visit", "arguments": "{}"}},
        ],
    }
    assert messages[3] == {
        "role": "tool",
        "tool_call_id": "h1",
        "name": "book_visit",
        "content": "Booked: Tuesday 9 a.m.",
    }
    assert messages[4]["content"] == "Error: not now"
    assert messages[5]["content"] == "Error: arguments are not valid JSON"  # not "Error: Error:"
    assert messages[6] == {"role": "assistant", "content": "You're booked for Tuesday at nine."}
    asyncio.run(llm.aclose())


def test_dropping_old_turns_never_leaves_an_output_without_its_call() -> None:
    call = Message("assistant", "", (ToolCall("c1", "end_call", "{}"),))
    output = ToolOutput("c1", "end_call", "ok")
    later = (Message("user", "Hello?"), Message("assistant", "Hi."))

    conversation = (Message("user", "Hi"), call, output, *later)
    assert tuple(keep_newest(conversation, len(conversation) // 2)) == later
    assert keep_newest((call, output, output), 1) == []


# --- the shipped model: its template cannot do tools -----------------------------


async def test_the_shipped_template_cannot_do_tools_so_they_are_left_out_with_one_warning(
    smollm: LocalLLM, caplog: pytest.LogCaptureFixture
) -> None:
    assert smollm._tools_supported is False  # llama.cpp's own verdict, read at load
    local._warned_no_tools.clear()  # whatever earlier tests in this process logged
    request = ChatRequest(SYSTEM, HISTORY, TOOLS)

    assert "tools" not in smollm._body(request)
    assert "tools" not in smollm._body(request)
    # The same model loaded again (as `callbrain test` does per scenario): no new warning.
    again = LocalLLM(model_config())
    try:
        await again.warmup(request)
        assert again._tools_supported is False
        assert "tools" not in again._body(request)
    finally:
        await again.aclose()
    warnings = [r for r in caplog.records if "cannot do tool calls" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert smollm.model in message
    assert "(book_visit, end_call)" in message  # what the agent loses
    assert "llm.model_path" in message and "llm.chat_template" in message  # what to do


async def test_the_shipped_model_answers_in_text_when_given_tools(smollm: LocalLLM) -> None:
    request = ChatRequest(SYSTEM, HISTORY, TOOLS)
    chunks = await collect(smollm, request)

    assert assert_clean_end(chunks, request) == []
    assert "".join(c.text for c in chunks if isinstance(c, TextDelta)).strip()


# --- a tool-capable template ---------------------------------------------------


async def test_a_tool_capable_template_gets_the_tools(hermes: LocalLLM) -> None:
    assert hermes._tools_supported is True
    request = ChatRequest(SYSTEM, (Message("user", "Book me in on Wednesday."),), TOOLS)
    assert hermes._body(request)["tools"]

    # Whatever the model makes of them, the stream ends cleanly.
    assert_clean_end(await collect(hermes, request), request)


async def test_earlier_calls_and_outputs_are_accepted_by_a_template_with_object_arguments(
    hermes: LocalLLM,
) -> None:
    # llama.cpp parses every earlier call's arguments for this template: one
    # empty or malformed argument text would fail this and every later turn.
    request = ChatRequest(SYSTEM, HISTORY, TOOLS)
    assert_clean_end(await collect(hermes, request), request)


async def test_a_call_the_model_writes_comes_back_whole_with_a_fresh_id(
    hermes: LocalLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One worked example, and the reply opened with <tool_call> (llama.cpp
    # continues a final assistant message): a 135M model then reliably writes
    # a call, though what it puts in it is its own.
    example: tuple[ChatItem, ...] = (
        Message("user", "Book Monday."),
        Message("assistant", "", (ToolCall("e1", "book_visit", '{"day": "Monday"}'),)),
        ToolOutput("e1", "book_visit", "Booked."),
        Message("assistant", "Done."),
    )
    request = ChatRequest(
        SYSTEM,
        (*example, Message("user", "Book Wednesday."), Message("assistant", "<tool_call>\n")),
        TOOLS,
    )
    body = hermes._body
    monkeypatch.setattr(hermes, "_body", lambda r: {**body(r), "max_tokens": 40})

    calls = assert_clean_end(await collect(hermes, request), request)
    assert len(calls) >= 1
    assert all(len(call.id) >= 8 for call in calls)


# --- stream assembly, on replayed llama.cpp chunks -------------------------------


class ReplayedLlama:
    """Stands in for ``xllamacpp.Server``: hands over fixed chunks, records the body."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks
        self.bodies: list[dict[str, Any]] = []

    def handle_chat_completions(self, body: dict[str, Any], on_chunk: Any) -> None:
        self.bodies.append(body)
        for chunk in self.chunks:
            if on_chunk(chunk):
                return


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def fragment(index: int, id: str | None = None, name: str | None = None, args: str = "") -> Any:
    function = {"name": name} if name else {}
    if args:
        function["arguments"] = args
    call: dict[str, Any] = {"index": index, "function": function}
    if id:
        call |= {"id": id, "type": "function"}
    return delta(tool_calls=[call])


def finish(reason: str) -> list[dict[str, Any]]:
    return [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]},
        {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 20}},
    ]


async def replay(
    chunks: list[dict[str, Any]], request: ChatRequest, **settings: Any
) -> list[ChatChunk]:
    llm = LocalLLM(LocalConfig(provider="local", **settings))
    server = ReplayedLlama(chunks)

    async def loaded() -> ReplayedLlama:
        return server

    llm._ensure_server = loaded  # type: ignore[method-assign]
    try:
        return await collect(llm, request)
    finally:
        await llm.aclose()


async def test_interleaved_fragments_become_whole_calls_with_unique_ids() -> None:
    request = ChatRequest(SYSTEM, HISTORY, TOOLS)
    chunks = [
        delta(role="assistant", content=None),
        delta(content="Sure, "),
        delta(content="booking now."),
        fragment(0, id="h1", name="book_visit", args='{"day'),  # an id already in the history
        fragment(1, name="end_call"),  # no id, no arguments
        fragment(0, args='": "Wed'),
        fragment(0, args='nesday"}'),
        *finish("tool_calls"),
    ]
    out = await replay(chunks, request)

    # The text comes first, whole (a sentence at a time), then the calls.
    assert [type(c) for c in out] == [TextDelta, ToolCall, ToolCall, Usage]
    assert spoken(out) == "Sure, booking now."
    book, hang_up = out[1], out[2]
    assert isinstance(book, ToolCall) and isinstance(hang_up, ToolCall)
    assert (book.name, book.arguments) == ("book_visit", '{"day": "Wednesday"}')
    assert (hang_up.name, hang_up.arguments) == ("end_call", "")
    assert_clean_end(out, request)


async def test_a_call_cut_off_by_max_tokens_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    request = ChatRequest(SYSTEM, (Message("user", "Book Monday and Friday."),), TOOLS)
    chunks = [
        fragment(0, id="a", name="book_visit", args='{"day": "Monday"}'),
        fragment(1, id="b", name="book_visit", args='{"day": "Fri'),
        *finish("length"),
    ]
    out = await replay(chunks, request)

    calls = assert_clean_end(out, request)
    assert [(c.id, c.arguments) for c in calls] == [("a", '{"day": "Monday"}')]
    assert "max_tokens cut off" in caplog.text


async def test_a_last_call_that_was_complete_when_max_tokens_hit_is_kept() -> None:
    request = ChatRequest(SYSTEM, (Message("user", "Book Monday."),), TOOLS)
    chunks = [fragment(0, id="a", name="book_visit", args='{"day": "Monday"}'), *finish("length")]

    calls = assert_clean_end(await replay(chunks, request), request)
    assert [c.id for c in calls] == ["a"]


def text_chunks(*pieces: str) -> list[dict[str, Any]]:
    return [delta(content=piece) for piece in pieces]


def spoken(chunks: list[ChatChunk]) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextDelta))


async def test_text_cut_by_max_tokens_ends_at_its_last_whole_sentence() -> None:
    request = ChatRequest(SYSTEM, (Message("user", "When are you open?"),))
    reply = text_chunks("We're open", " nine to five.", " On Saturdays", " we open at")

    out = await replay([*reply, *finish("length")], request)
    assert spoken(out) == "We're open nine to five."
    assert [type(c) for c in out] == [TextDelta, Usage]
    # A reply the model ended itself is said whole, last words included.
    assert spoken(await replay([*reply, *finish("stop")], request)) == "".join(
        c["choices"][0]["delta"]["content"] for c in reply
    )
    # Unless the setting is off: then every token is passed on as it comes.
    raw = await replay([*reply, *finish("length")], request, whole_sentences=False)
    assert [c.text for c in raw if isinstance(c, TextDelta)] == [
        "We're open",
        " nine to five.",
        " On Saturdays",
        " we open at",
    ]


async def test_a_cut_reply_keeps_its_whole_tool_calls_and_says_the_text_first() -> None:
    request = ChatRequest(SYSTEM, (Message("user", "Book Monday."),), TOOLS)
    call = fragment(0, id="a", name="book_visit", args='{"day": "Monday"}')
    chunks = [*text_chunks("One moment.", " I will book"), call, *finish("length")]
    out = await replay(chunks, request)

    assert [type(c) for c in out] == [TextDelta, ToolCall, Usage]
    assert spoken(out) == "One moment."
    # No whole sentence at all, but a whole call: the call is what matters.
    out = await replay([*text_chunks("I will book"), call, *finish("length")], request)
    assert [type(c) for c in out] == [ToolCall, Usage]


async def test_a_reply_without_one_whole_sentence_before_max_tokens_is_an_error() -> None:
    # Nothing of it can be said: the turn speaks the agent's fallback line instead.
    request = ChatRequest(SYSTEM, (Message("user", "Hi"),))
    chunks = [*text_chunks("Well, I think that the", " best thing"), *finish("length")]
    with pytest.raises(LLMError, match=r"max_tokens \(80\) before its first sentence"):
        await replay(chunks, request)


async def test_a_missing_chat_template_file_fails_the_load_clearly() -> None:
    model = LocalLLM(model_config(chat_template="/nonexistent/tools.jinja"))
    try:
        with pytest.raises(
            LLMError, match=r"cannot read chat_template file /nonexistent/tools\.jinja"
        ):
            await model.warmup()
    finally:
        await model.aclose()
