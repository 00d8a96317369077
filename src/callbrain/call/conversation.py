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

A conversation is shortened in two places, each through one function here:
:func:`fit_transcript` cuts an inbound transcript to ``max_transcript_chars``
(oldest text first), and :func:`keep_newest` keeps the newest messages (the
agent's ``max_history_messages``, and the local model when its context is
full).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from callbrain.llm.chat import (
    ChatItem,
    ChatRequest,
    Message,
    ToolCall,
    ToolOutput,
    ToolSpec,
    keep_newest,
)
from callbrain.retell.frames import ReminderRequired, ResponseRequired, UpdateOnly, Utterance

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
    return keep_newest(items, max_messages)


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


# ------------------------------------------------------------- transcript size

TranscriptFrame = UpdateOnly | ResponseRequired | ReminderRequired


def fit_transcript(frame: TranscriptFrame, limit: int) -> tuple[TranscriptFrame, str | None]:
    """``frame`` with its transcript text cut to ``limit`` characters from the
    oldest end, and what was cut, for the log (None when it fitted).

    Utterances left out keep their place, emptied, so positions in the
    transcript (the anchors of the call's tool history) keep counting the same;
    the chat request skips empty utterances. A newest utterance longer than the
    limit on its own keeps its last ``limit`` characters. Retell's woven
    ``transcript_with_tool_calls``, which replaces the transcript in the model
    request when turned on, loses its oldest items the same way.
    """
    update: dict[str, Any] = {}
    notes: list[str] = []
    fitted = _fit_utterances(frame.transcript, limit)
    if fitted is not None:
        update["transcript"], total, left_out = fitted
        notes.append(f"transcript of {total} chars: the oldest {left_out} utterance(s) left out")
    woven = frame.transcript_with_tool_calls
    fitted_woven = None if woven is None else _fit_woven(woven, limit)
    if fitted_woven is not None:
        update["transcript_with_tool_calls"], total, left_out = fitted_woven
        notes.append(f"transcript_with_tool_calls of {total} chars: the oldest {left_out} left out")
    if not update:
        return frame, None
    described = f"over max_transcript_chars ({limit}): " + "; ".join(notes)
    return frame.model_copy(update=update), described


def _fit_utterances(
    transcript: list[Utterance], limit: int
) -> tuple[list[Utterance], int, int] | None:
    sizes = [len(u.content) for u in transcript]
    total = sum(sizes)
    if total <= limit:
        return None
    start = _newest_within(sizes, limit)
    fitted = list(transcript)
    if start == len(fitted):
        newest = fitted[-1]
        fitted[-1] = newest.model_copy(update={"content": newest.content[-limit:]})
        start -= 1
    left_out = 0
    for i in range(start):
        if fitted[i].content:
            fitted[i] = fitted[i].model_copy(update={"content": ""})
            left_out += 1
    return fitted, total, left_out


def _fit_woven(
    items: list[dict[str, Any]], limit: int
) -> tuple[list[dict[str, Any]], int, int] | None:
    sizes = [
        sum(len(v) for k in ("content", "arguments") if isinstance(v := i.get(k), str))
        for i in items
    ]
    total = sum(sizes)
    if total <= limit:
        return None
    start = _newest_within(sizes, limit)
    kept = items[start:]
    newest = items[-1]
    if not kept and isinstance(newest.get("content"), str):
        kept = [{**newest, "content": newest["content"][-limit:]}]
    return kept, total, len(items) - len(kept)


def _newest_within(sizes: list[int], limit: int) -> int:
    """Where the longest run of newest items that fits in ``limit`` starts."""
    start, budget = len(sizes), limit
    while start > 0 and sizes[start - 1] <= budget:
        start -= 1
        budget -= sizes[start]
    return start


def last_caller_text(transcript: Sequence[Utterance]) -> str:
    """The caller's last words, if the caller spoke last (else "": the agent did)."""
    for utterance in reversed(transcript):
        if utterance.content.strip():
            return "" if utterance.is_agent else utterance.content.strip()
    return ""
