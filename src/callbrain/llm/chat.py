"""The provider-neutral vocabulary: what goes into a completion and what comes out.

Requests are a system prompt, a conversation and the tools the model may call.
The conversation holds two kinds of items: :class:`Message` (a user or assistant
turn; an assistant turn may carry :class:`ToolCall` s) and :class:`ToolOutput`
(what one of those calls returned).

Invariant every backend may rely on (``callbrain.call.conversation`` guarantees it):
an assistant message with tool calls is immediately followed by one
:class:`ToolOutput` per call, in the same order, and every output follows its
call. Providers reject conversations that break it (OpenAI: a call without a
``tool`` message; Anthropic: a ``tool_use`` without its ``tool_result``).

Out of a completion comes a stream of chunks: :class:`TextDelta` as the model
writes, a complete :class:`ToolCall` once its arguments have fully arrived, and
:class:`Usage` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as the model sees it: a name, what it is for, a JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call. ``arguments`` is the JSON text exactly as the model
    wrote it, which may be malformed: the tools layer repairs and validates it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation turn. Only assistant turns carry ``tool_calls``."""

    role: Literal["user", "assistant"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """What a tool call returned (or why it failed: ``is_error``), for the model."""

    call_id: str
    name: str
    content: str
    is_error: bool = False


ChatItem = Message | ToolOutput


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """Everything a backend needs for one completion.

    The system prompt is kept apart from the messages because providers disagree
    on where it goes (OpenAI: first message; Anthropic: a separate parameter).
    """

    system: str
    messages: tuple[ChatItem, ...]
    tools: tuple[ToolSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text to speak, in the order the model produced it."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for the completion, when the provider reports them."""

    input_tokens: int
    output_tokens: int


ChatChunk = TextDelta | ToolCall | Usage


def keep_newest(items: Sequence[ChatItem], count: int) -> list[ChatItem]:
    """The newest ``count`` items of a conversation, less any tool output at the
    front whose call was left out (an output without its call breaks every
    provider's rules). The one way a conversation is shortened."""
    kept = list(items[-count:]) if count > 0 else []
    while kept and isinstance(kept[0], ToolOutput):
        kept.pop(0)
    return kept


class ToolCallAssembler:
    """Rebuilds complete calls from OpenAI-style streamed fragments.

    OpenAI (and llama.cpp, vLLM, ...) stream each call as fragments keyed by
    ``index``: the first names the call and gives its id, later ones append to the
    arguments. Several calls of one message interleave by index, so fragments are
    collected per index and the calls come out in index order once the stream ends.
    """

    def __init__(self, id_prefix: str = "call") -> None:
        self._parts: dict[int, list[str]] = {}
        self._ids: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._id_prefix = id_prefix

    def add(self, index: int, *, id: str | None, name: str | None, arguments: str | None) -> None:
        """Take one fragment; any of its fields may be missing."""
        self._parts.setdefault(index, [])
        if id:
            self._ids[index] = id
        if name:
            # Some servers repeat the name on every fragment; a few split it.
            known = self._names.get(index, "")
            self._names[index] = name if name == known or not known else known + name
        if arguments:
            self._parts[index].append(arguments)

    def calls(self, seed: str = "") -> list[ToolCall]:
        """The assembled calls, in index order; a call without an id gets one.

        Calls without a name are dropped: nothing could run them.
        """
        calls = []
        for index in sorted(self._parts):
            name = self._names.get(index)
            if not name:
                continue
            call_id = self._ids.get(index) or f"{self._id_prefix}_{seed}{index}"
            calls.append(ToolCall(call_id, name, "".join(self._parts[index])))
        return calls
