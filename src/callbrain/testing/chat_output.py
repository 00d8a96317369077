"""Where ``callbrain chat`` shows the conversation: the output side, with no socket.

:class:`~callbrain.testing.chat.ChatCall` describes what the agent does as
lines and streaming lines; a :class:`ChatOutput` decides how they look. On a
pipe (or a terminal without a prompt) that is :class:`ConsoleOutput`: lines in
order; the terminal with a prompt has its own in
:mod:`callbrain.testing.chat_terminal`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Protocol

from rich.console import Console
from rich.text import Text

from callbrain.testing.client import Frame

HELP = (
    "Type what the caller says and press Enter. Starting to type while the agent speaks "
    "interrupts it, as speaking over it does on a call.",
    "/remind  stay silent: Retell asks the agent for a reminder",
    "/quit    hang up (Ctrl-D and Ctrl-C too)",
    "/help    this help",
)

CLOSE_MEANING = {
    # What Retell makes of a close code from the server.
    1000: "a deliberate hang-up",
    1005: "no status code: Retell reports error_llm_websocket_open",
    1006: "abnormal, no close frame: Retell would reconnect",
    1007: "corrupt payload",
    1011: "a server error",
}
_RESULT_CHARS = 160

Kind = Literal["greeting", "reply", "reminder", "unprompted"]
_PREFIX: dict[Kind, str] = {
    "greeting": "agent: ",
    "reply": "agent: ",
    "reminder": "agent (reminder): ",
    "unprompted": "agent (unprompted): ",
}


class ChatOutput(Protocol):
    """Where the conversation is shown. A streaming line is keyed, so the sink decides
    how to show other lines printed while it is still open."""

    def stream(self, key: str, prefix: Text, text: Text) -> None:
        """Add ``text`` to the open line ``key``, started with ``prefix`` if new."""

    def end_stream(self, key: str, prefix: Text, suffix: Text) -> None:
        """Close line ``key`` with ``suffix`` (a line of its own if ``key`` was never opened)."""

    def line(self, text: Text) -> None:
        """Show one whole line."""


class ConsoleOutput:
    """A :class:`ChatOutput` that writes lines in order to a rich console (a pipe or a
    terminal without a prompt). A line printed while another streams breaks it; the
    rest of the streaming line continues after an ellipsis."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._open: str | None = None
        self._started: set[str] = set()

    def _print(self, text: Text, end: str = "\n") -> None:
        # soft_wrap: long replies stay on one line in a pipe instead of wrapping at 80.
        self.console.print(text, end=end, soft_wrap=True, highlight=False)
        self.console.file.flush()

    def _break(self) -> None:
        if self._open is not None:
            self._print(Text())
            self._open = None

    def stream(self, key: str, prefix: Text, text: Text) -> None:
        if self._open != key:
            self._break()
            self._print(prefix + ("... " if key in self._started else ""), end="")
            self._started.add(key)
            self._open = key
            text = lstrip(text)  # the prefix ends in a space
        self._print(text, end="")

    def end_stream(self, key: str, prefix: Text, suffix: Text) -> None:
        if self._open == key:
            self._print(suffix)
            self._open = None
        else:
            self.line(prefix + lstrip(suffix))

    def line(self, text: Text) -> None:
        self._break()
        self._print(text)


def lstrip(text: Text) -> Text:
    """``text`` without leading spaces, for when it starts a line after a prefix."""
    return Text(text.plain.lstrip(), style=text.style)


def prefix(kind: Kind) -> Text:
    return Text(_PREFIX[kind], style="bold cyan")


def action_name(action: Frame) -> str:
    return {"end_call": "hang-up", "transfer_number": "transfer"}.get(next(iter(action)), "digits")


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def shorten(text: str, limit: int = _RESULT_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
