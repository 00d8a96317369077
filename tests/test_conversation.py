"""Transcript to provider-neutral messages."""

from __future__ import annotations

from callbrain.call.conversation import (
    ToolExchange,
    build_chat_request,
    render_template,
    transcript_to_messages,
    woven_to_messages,
)
from callbrain.llm.chat import Message, ToolCall, ToolOutput, ToolSpec
from callbrain.retell.frames import Utterance


def utt(role: str, content: str) -> Utterance:
    return Utterance(role=role, content=content)


def test_roles_map_and_same_role_turns_merge() -> None:
    transcript = [
        utt("agent", "Hi, Sunrise Clinic."),
        utt("agent", "How can I help?"),
        utt("user", "I need"),
        utt("transfer_target", "an appointment"),
        utt("user", "   "),
        utt("agent", "Sure."),
    ]
    assert transcript_to_messages(transcript, max_messages=10) == [
        Message("assistant", "Hi, Sunrise Clinic. How can I help?"),
        Message("user", "I need an appointment"),
        Message("assistant", "Sure."),
    ]


def test_history_is_bounded_to_the_latest_turns() -> None:
    transcript = [utt("user" if i % 2 else "agent", f"turn {i}") for i in range(30)]
    messages = transcript_to_messages(transcript, max_messages=4)
    assert [m.content for m in messages] == ["turn 26", "turn 27", "turn 28", "turn 29"]


def test_template_renders_known_and_reports_missing() -> None:
    text, missing = render_template(
        "Hi {{name}}, calling from {{ city }}? {{unknown}}", {"name": "Ann", "city": "Leeds"}
    )
    assert text == "Hi Ann, calling from Leeds? "
    assert missing == ["unknown"]


def test_request_renders_system_prompt_with_variables() -> None:
    request, missing = build_chat_request(
        system_prompt="Caller is {{customer_name}}.",
        transcript=[utt("user", "Hello")],
        variables={"customer_name": "John Doe"},
        max_messages=10,
    )
    assert request.system == "Caller is John Doe."
    assert request.messages == (Message("user", "Hello"),)
    assert missing == []


def test_reminder_adds_the_instruction_as_the_last_user_turn() -> None:
    request, _ = build_chat_request(
        system_prompt="sys",
        transcript=[utt("user", "Can I book?"), utt("agent", "Which day suits you?")],
        variables={},
        max_messages=10,
        reminder_prompt="(Check in briefly.)",
    )
    assert request.messages[-1] == Message("user", "(Check in briefly.)")
    assert request.messages[-2] == Message("assistant", "Which day suits you?")


def test_reminder_after_a_user_turn_is_merged_into_it() -> None:
    request, _ = build_chat_request(
        system_prompt="sys",
        transcript=[utt("user", "Hello?")],
        variables={},
        max_messages=10,
        reminder_prompt="(Check in briefly.)",
    )
    assert request.messages == (Message("user", "Hello?\n\n(Check in briefly.)"),)


# ----------------------------------------------------------------- tool calls


def call(call_id: str, name: str = "check", arguments: str = "{}") -> ToolCall:
    return ToolCall(call_id, name, arguments)


def output(call_id: str, content: str = "ok", name: str = "check") -> ToolOutput:
    return ToolOutput(call_id, name, content)


def test_history_is_woven_in_at_its_anchor_with_each_output_after_its_call() -> None:
    transcript = [
        utt("agent", "Hi."),
        utt("user", "Book Friday."),
        utt("agent", "Done, you're booked."),
    ]
    history = [
        ToolExchange(2, call("c1", "book"), output("c1", "booked", "book")),
        ToolExchange(2, call("c2"), output("c2")),
    ]
    assert transcript_to_messages(transcript, 10, history) == [
        Message("assistant", "Hi."),
        Message("user", "Book Friday."),
        Message("assistant", "", (call("c1", "book"), call("c2"))),
        output("c1", "booked", "book"),
        output("c2"),
        Message("assistant", "Done, you're booked."),
    ]


def test_history_after_the_last_utterance_goes_at_the_end() -> None:
    history = [ToolExchange(5, call("c1"), output("c1"))]
    messages = transcript_to_messages([utt("user", "Hello")], 10, history)
    assert messages == [
        Message("user", "Hello"),
        Message("assistant", "", (call("c1"),)),
        output("c1"),
    ]


def test_woven_transcript_keeps_words_before_a_call_and_drops_unfinished_calls() -> None:
    woven = [
        {"role": "agent", "content": "Hello.", "words": []},
        {"role": "user", "content": "Is Friday free?"},
        {"role": "agent", "content": "Let me check."},
        {"role": "tool_call_invocation", "tool_call_id": "c1", "name": "check", "arguments": "{}"},
        {"role": "tool_call_result", "tool_call_id": "c1", "content": "free", "successful": True},
        {"role": "agent", "content": "Friday is free."},
        {"role": "node_transition", "former_node_id": "a"},
        {"role": "dtmf", "digit": "1"},
        {"role": "tool_call_invocation", "tool_call_id": "c2", "name": "book", "arguments": "{}"},
        {"role": "tool_call_result", "tool_call_id": "zz", "content": "orphan result"},
    ]
    assert woven_to_messages(woven, 10) == [
        Message("assistant", "Hello."),
        Message("user", "Is Friday free?"),
        Message("assistant", "Let me check.", (call("c1"),)),
        output("c1", "free"),
        Message("assistant", "Friday is free."),
        Message("user", "(The caller pressed 1 on the keypad.)"),
    ]


def test_woven_result_that_failed_is_an_error_output() -> None:
    woven = [
        {"role": "user", "content": "Book it."},
        {"role": "tool_call_invocation", "tool_call_id": "c1", "name": "book", "arguments": "{}"},
        {"role": "tool_call_result", "tool_call_id": "c1", "content": "no", "successful": False},
    ]
    assert woven_to_messages(woven, 10)[-1] == ToolOutput("c1", "book", "no", is_error=True)


def test_trimming_never_starts_with_an_output_cut_from_its_call() -> None:
    history = [ToolExchange(1, call("c1"), output("c1"))]
    transcript = [utt("user", "Check."), utt("agent", "Free."), utt("user", "Thanks.")]
    messages = transcript_to_messages(transcript, 3, history)
    assert messages == [Message("assistant", "Free."), Message("user", "Thanks.")]


def test_request_uses_the_woven_transcript_and_carries_tools() -> None:
    spec = ToolSpec("check", "Check a day.")
    request, _ = build_chat_request(
        system_prompt="sys",
        transcript=[utt("user", "ignored when woven is given")],
        variables={},
        max_messages=10,
        tools=[spec],
        woven=[{"role": "user", "content": "Hi"}],
    )
    assert request.messages == (Message("user", "Hi"),)
    assert request.tools == (spec,)


def test_reminder_after_a_tool_output_is_its_own_user_turn() -> None:
    request, _ = build_chat_request(
        system_prompt="sys",
        transcript=[utt("user", "Check.")],
        variables={},
        max_messages=10,
        reminder_prompt="(Check in.)",
        history=[ToolExchange(1, call("c1"), output("c1"))],
    )
    assert request.messages[-2:] == (output("c1"), Message("user", "(Check in.)"))
