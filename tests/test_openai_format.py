"""The chat-completions shapes shared by the OpenAI and local backends."""

from __future__ import annotations

import pytest

from callbrain.llm.chat import ChatRequest, Message, ToolCall, ToolOutput, ToolSpec
from callbrain.llm.openai_format import chat_messages, finished_calls, tool_params, used_call_ids


def test_calls_and_outputs_map_with_object_arguments_and_error_text() -> None:
    request = ChatRequest(
        "sys",
        (
            Message("user", "Hi"),
            Message(
                "assistant",
                "",
                (ToolCall("a", "check", '{"day": "fri"}'), ToolCall("b", "hang", "")),
            ),
            ToolOutput("a", "check", "free"),
            ToolOutput("b", "hang", "line busy", is_error=True),
        ),
    )
    system, user, assistant, ok, failed = chat_messages(request)
    assert system == {"role": "system", "content": "sys"} and user["content"] == "Hi"
    assert "content" not in assistant  # empty text beside calls is left out
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == ['{"day": "fri"}', "{}"]
    assert ok == {"role": "tool", "tool_call_id": "a", "content": "free"}
    assert failed["content"] == "Error: line busy"
    named = chat_messages(request, name_outputs=True)
    assert named[-1]["name"] == "hang"


def test_tool_params() -> None:
    spec = ToolSpec("check", "Check a day.", {"type": "object", "properties": {}})
    assert tool_params([spec]) == [
        {
            "type": "function",
            "function": {
                "name": "check",
                "description": "Check a day.",
                "parameters": spec.parameters,
            },
        }
    ]


def test_a_call_cut_off_by_max_tokens_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    calls = [ToolCall("a", "check", '{"day":"mon"}'), ToolCall("b", "book", '{"day": "Wedn')]
    assert list(finished_calls(calls, "length", set(), provider="test")) == [calls[0]]
    assert "max_tokens cut off" in caplog.text
    whole = [ToolCall("a", "check", '{"day":"mon"}')]
    assert list(finished_calls(list(whole), "length", set(), provider="test")) == whole


def test_repeated_ids_are_replaced_with_fresh_ones() -> None:
    earlier = ChatRequest("", (Message("assistant", "", (ToolCall("x", "check", "{}"),)),))
    taken = used_call_ids(earlier)
    calls = [
        ToolCall("x", "check", "{}"),
        ToolCall("y", "check", "{}"),
        ToolCall("y", "book", "{}"),
    ]
    ids = [c.id for c in finished_calls(calls, "tool_calls", taken, provider="test")]
    assert ids[1] == "y" and len(set(ids)) == 3 and "x" not in ids
