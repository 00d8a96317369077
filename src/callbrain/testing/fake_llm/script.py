"""What a fake LLM server is told to answer (:class:`Reply`, :class:`FakeToolCall`)
and what it records of each request (:class:`RecordedRequest`)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["open", "completed", "client_disconnected", "dropped", "error_status"]
"""How a recorded request ended; ``"open"`` while it is still being answered."""

JSONObject = dict[str, Any]

_WORD = re.compile(r"\s*\S+\s*$|\s*\S+|\s+")


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call for a :class:`Reply` to make, after its text.

    ``arguments`` as a dict is sent as JSON; as a string it is sent verbatim, so
    a test can script malformed arguments. ``id`` defaults to a provider-shaped
    id that is unique per request and position.
    """

    name: str
    arguments: str | dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def arguments_text(self) -> str:
        """The arguments as the wire carries them."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass
class Reply:
    """One scripted completion: what to say, how fast, and how to fail.

    ``text`` as a ``str`` is split into word-sized deltas that keep their
    spaces (``"".join(reply.deltas) == text``); a sequence gives the exact
    deltas. A "content chunk" below is one such delta on the wire.
    """

    text: str | Sequence[str] = "OK."
    tool_calls: Sequence[FakeToolCall] = ()
    """Tool calls made after the text, in order (several make a parallel call).
    Each counts as one content chunk for ``ttft``, ``chunk_delay``,
    ``stall_after`` and ``drop_after``."""
    ttft: float = 0.0
    """Seconds from the request to the first content chunk. The HTTP status,
    headers and content-free preamble events go out at once, as real providers
    do, so a client's first-token deadline must look at content, not bytes."""
    chunk_delay: float = 0.0
    """Seconds between later content chunks."""
    status: int | None = None
    """Answer with this HTTP error status and a provider-shaped JSON error body
    instead of a completion (429 also gets ``retry-after`` headers)."""
    stall_after: int | None = None
    """After this many content chunks send nothing more, keeping the connection
    open until the client goes away (or the server stops)."""
    drop_after: int | None = None
    """After this many content chunks abort the connection mid-stream, without
    the terminating events, so the client sees an incomplete body."""
    malformed_after: int | None = None
    """After this many content chunks send an event whose data is cut off in the
    middle of its JSON (a buggy compatible server, or a proxy that mangles the
    stream), then go on as scripted."""
    ending_events: int | None = None
    """Send only this many of the events that end a stream (OpenAI: the
    ``finish_reason`` chunk, the usage chunk if asked for, ``data: [DONE]``;
    Anthropic: the text block's ``content_block_stop`` if still open,
    ``message_delta``, ``message_stop``); ``None``: all of them."""
    hold_open: bool = False
    """After the ending events keep the connection open, without ending the
    body, until the client goes away: a provider or proxy that says it has
    finished but never closes the stream."""
    usage: tuple[int, int] = (12, 7)
    """Input and output tokens reported at the end."""
    retry_after: float = 0.01
    """Seconds advertised in ``retry-after-ms``/``retry-after`` on a 429, kept
    small so SDK retries in tests are fast."""

    @property
    def deltas(self) -> list[str]:
        """The content chunks, in order."""
        if isinstance(self.text, str):
            return _WORD.findall(self.text)
        return list(self.text)

    @property
    def full_text(self) -> str:
        """What a client should see once it has joined every delta."""
        return "".join(self.deltas)

    @property
    def items(self) -> list[str | FakeToolCall]:
        """Every content chunk in sending order: text deltas, then tool calls."""
        return [*self.deltas, *self.tool_calls]


ReplyFunction = Callable[[JSONObject], Reply]
"""Chooses the reply to one request from its parsed JSON body (a non-object
body arrives as ``{"_not_an_object": body}``). Called once per request, in
arrival order, on the event loop: keep it quick and do not block."""


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, and what became of it."""

    index: int
    path: str
    body: JSONObject
    """The request's parsed JSON body."""
    headers: dict[str, str]
    """Request headers, names lower-cased."""
    reply: Reply
    """The scripted reply that answered it."""
    client: str = ""
    """The client's ``host:port``: the same for requests over one kept-alive connection."""
    started: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request arrived."""
    received_at: float = field(default_factory=time.time)
    """Wall-clock time (``time.time()``) when the request arrived."""
    ended: float | None = None
    """``time.monotonic()`` when the outcome was settled."""
    chunks_sent: int = 0
    """Content chunks handed to the server for sending."""
    outcome: Outcome = "open"

    @property
    def streaming(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return self.body.get("stream") is True
