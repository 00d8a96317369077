"""Turn Retell's live transcript into a provider-neutral chat request.

Retell resends the whole transcript with every request, so the conversation is
rebuilt from it each turn rather than accumulated: whatever Retell heard is the
truth, including words the caller spoke over the agent.

Tool calls are not in that transcript. They come either from Retell's
``transcript_with_tool_calls`` (when the agent turns it on in ``config``, Retell
weaves the calls and results we reported back in, at the point they happened)
or from the call's own :class:`ToolExchange` history, anchored at the transcript
position where they ran. Either way the model learns what already happened, a
booking included, even after the turn that made it was cut short.

Whatever the source, the result keeps the invariant backends rely on (see
:mod:`callbrain.llm.chat`): every tool call is immediately followed by its
output. Calls without a result (cut short) and results without a call (their
call trimmed away) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from callbrain.llm.chat import ChatItem, ChatRequest, Message, ToolCall, ToolOutput, ToolSpec
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


@dataclass(frozen=True, slots=True)
class ToolExchange:
    """A tool call that ran, and what it returned, in the call's history."""

    anchor: int
    """How many transcript utterances came before it."""
    call: ToolCall
    output: ToolOutput


_Entry = tuple[Literal["user", "assistant"], str] | ToolCall | ToolOutput


def transcript_to_messages(
    transcript: Sequence[Utterance],
    max_messages: int,
    history: Sequence[ToolExchange] = (),
) -> list[ChatItem]:
    """Map utterances to chat turns (agent to assistant, every other role to user)
    with the tool ``history`` woven in at its anchors.

    Consecutive same-role utterances are merged (Retell splits a turn when the
    caller pauses, and several providers reject two user turns in a row), empty
    ones are dropped, and only the last ``max_messages`` items are kept.
    """
    entries: list[_Entry] = []
    pending = sorted(history, key=lambda exchange: exchange.anchor)
    for index, utterance in enumerate(transcript):
        while pending and pending[0].anchor <= index:
            exchange = pending.pop(0)
            entries += [exchange.call, exchange.output]
        entries.append(("assistant" if utterance.is_agent else "user", utterance.content))
    for exchange in pending:
        entries += [exchange.call, exchange.output]
    return _assemble(entries, max_messages)


def woven_to_messages(woven: Sequence[Mapping[str, Any]], max_messages: int) -> list[ChatItem]:
    """Map Retell's ``transcript_with_tool_calls`` items to chat items.

    Unknown roles (node transitions, SMS, future ones) are skipped; a keypad press
    becomes a short user note so the model knows about it.
    """
    entries: list[_Entry] = []
    for item in woven:
        role = item.get("role")
        if role == "tool_call_invocation":
            call_id, name = item.get("tool_call_id"), item.get("name")
            if isinstance(call_id, str) and isinstance(name, str):
                arguments = item.get("arguments")
                entries.append(
                    ToolCall(call_id, name, arguments if isinstance(arguments, str) else "{}")
                )
        elif role == "tool_call_result":
            call_id = item.get("tool_call_id")
            if isinstance(call_id, str):
                content = item.get("content")
                failed = item.get("successful") is False
                entries.append(ToolOutput(call_id, "", str(content or ""), failed))
        elif role == "dtmf":
            entries.append(
                ("user", f"(The caller pressed {item.get('digit', '?')} on the keypad.)")
            )
        elif role in ("agent", "user", "transfer_target"):
            content = item.get("content")
            entries.append(("assistant" if role == "agent" else "user", str(content or "")))
    return _assemble(entries, max_messages)


def _assemble(entries: Iterable[_Entry], max_messages: int) -> list[ChatItem]:
    entries = list(entries)
    calls = {entry.id: entry for entry in entries if isinstance(entry, ToolCall)}
    outputs = {
        entry.call_id: entry
        for entry in entries
        if isinstance(entry, ToolOutput) and entry.call_id in calls
    }
    items: list[ChatItem] = []
    for entry in entries:
        if isinstance(entry, ToolOutput):
            continue  # emitted right after its call
        if isinstance(entry, ToolCall):
            output = outputs.get(entry.id)
            if output is None:
                continue  # cut short: no result to show the model
            if not output.name:
                output = ToolOutput(output.call_id, entry.name, output.content, output.is_error)
            _append_call(items, entry, output)
            continue
        role, text = entry
        text = text.strip()
        if not text:
            continue
        last = items[-1] if items else None
        if isinstance(last, Message) and last.role == role and not last.tool_calls:
            items[-1] = Message(role, f"{last.content} {text}")
        else:
            items.append(Message(role, text))
    if max_messages <= 0:
        return []
    items = items[-max_messages:]
    while items and isinstance(items[0], ToolOutput):
        items.pop(0)  # its call was trimmed away
    return items


def _append_call(items: list[ChatItem], call: ToolCall, output: ToolOutput) -> None:
    """Add a call and its output, joining the assistant's words just before it, or
    the previous call when nothing was said in between (a parallel call)."""
    outputs = 0
    while outputs < len(items) and isinstance(items[-1 - outputs], ToolOutput):
        outputs += 1
    head = items[-1 - outputs] if outputs < len(items) else None
    if isinstance(head, Message) and head.role == "assistant":
        if outputs and head.tool_calls:
            items[-1 - outputs] = Message("assistant", head.content, (*head.tool_calls, call))
            items.append(output)
            return
        if not outputs and not head.tool_calls:
            items[-1] = Message("assistant", head.content, (call,))
            items.append(output)
            return
    items += [Message("assistant", "", (call,)), output]


def build_chat_request(
    *,
    system_prompt: str,
    transcript: Sequence[Utterance],
    variables: Mapping[str, str],
    max_messages: int,
    reminder_prompt: str | None = None,
    tools: Sequence[ToolSpec] = (),
    history: Sequence[ToolExchange] = (),
    woven: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[ChatRequest, list[str]]:
    """The request for one turn, and the template variables that had no value.

    ``woven`` (Retell's ``transcript_with_tool_calls``) replaces ``transcript``
    and ``history`` when given. For a reminder the instruction is appended as a
    final user turn: the model then nudges the caller instead of answering the
    last thing they said again.
    """
    system, missing = render_template(system_prompt, variables)
    if woven is not None:
        messages = woven_to_messages(woven, max_messages)
    else:
        messages = transcript_to_messages(transcript, max_messages, history)
    if reminder_prompt:
        last = messages[-1] if messages else None
        if isinstance(last, Message) and last.role == "user":
            messages[-1] = Message("user", f"{last.content}\n\n{reminder_prompt}")
        else:
            messages.append(Message("user", reminder_prompt))
    return ChatRequest(system=system, messages=tuple(messages), tools=tuple(tools)), missing
