"""Turn Retell's live transcript into a provider-neutral chat request.

Retell resends the whole transcript with every request, so the conversation is
rebuilt from it each turn rather than accumulated: whatever Retell heard is the
truth, including words the caller spoke over the agent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from callbrain.llm.base import ChatRequest, Message
from callbrain.protocol import Utterance

DEFAULT_REMINDER_PROMPT = (
    "(The caller has been silent for a while. Check in with one short, friendly sentence, "
    "such as asking whether they are still there. Do not answer a question nobody asked.)"
)

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


def render_template(template: str, variables: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``{{name}}`` with its value, as Retell's own prompts do.

    A variable with no value renders as an empty string rather than being spoken
    as "curly curly customer name"; the missing names are returned so the caller
    can log them.
    """
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in variables:
            return variables[name]
        missing.append(name)
        return ""

    return _VARIABLE.sub(substitute, template), missing


def transcript_to_messages(transcript: Sequence[Utterance], max_messages: int) -> list[Message]:
    """Map utterances to chat turns: agent to assistant, every other role to user.

    Consecutive same-role utterances are merged (Retell splits a turn when the
    caller pauses, and several providers reject two user turns in a row), empty
    ones are dropped, and only the last ``max_messages`` turns are kept.
    """
    messages: list[Message] = []
    for utterance in transcript:
        text = utterance.content.strip()
        if not text:
            continue
        role: Literal["user", "assistant"] = "assistant" if utterance.is_agent else "user"
        if messages and messages[-1].role == role:
            messages[-1] = Message(role, f"{messages[-1].content} {text}")
        else:
            messages.append(Message(role, text))
    return messages[-max_messages:] if max_messages > 0 else []


def build_chat_request(
    *,
    system_prompt: str,
    transcript: Sequence[Utterance],
    variables: Mapping[str, str],
    max_messages: int,
    reminder_prompt: str | None = None,
) -> tuple[ChatRequest, list[str]]:
    """The request for one turn, and the template variables that had no value.

    For a reminder the instruction is appended as a final user turn: the model
    then nudges the caller instead of answering the last thing they said again.
    """
    system, missing = render_template(system_prompt, variables)
    messages = transcript_to_messages(transcript, max_messages)
    if reminder_prompt:
        if messages and messages[-1].role == "user":
            messages[-1] = Message("user", f"{messages[-1].content}\n\n{reminder_prompt}")
        else:
            messages.append(Message("user", reminder_prompt))
    return ChatRequest(system=system, messages=tuple(messages)), missing
