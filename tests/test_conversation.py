"""Transcript to provider-neutral messages."""

from __future__ import annotations

from callbrain.conversation import (
    build_chat_request,
    render_template,
    transcript_to_messages,
)
from callbrain.llm.base import Message
from callbrain.protocol import Utterance


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
