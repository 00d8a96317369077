"""A provider's stream of events, read to the provider's own end of it.

Both remote backends take their provider's Server-Sent Events as plain dicts
(the SDK still does the HTTP, the retries and the error mapping; the body is
decoded by :mod:`callbrain.llm.sse`) and hand each to a reader that knows the
wire format:
:class:`~callbrain.llm.openai_format.ChunkReader` or
:class:`~callbrain.llm.anthropic.EventReader`. What they share lives here.

**When the answer ends.** The provider says so: a ``finish_reason`` (OpenAI
and the servers that speak its API) or ``message_stop`` (Anthropic). The SDKs
read on until the body ends: Anthropic's past ``message_stop``, OpenAI's past
a ``finish_reason`` until ``data: [DONE]``. So a provider or proxy that
finishes but never closes the stream would hold the turn open until the idle
deadline, and the turn would then add its apology to a complete answer. Once
the reader has seen the finish, the rest of the body gets
:data:`END_GRACE_S`, in total, to arrive: what well-behaved servers send
right after the finish (OpenAI's usage chunk, ``[DONE]``, the end of the body)
comes within milliseconds, and reading it lets the connection go back to the
pool for the next turn. After the grace the response is closed, and the
answer is complete without whatever did not come (usage, at worst).

**What counts as a provider fault.** Output that cannot be read (not UTF-8,
not JSON, not an object, or missing a field its API always sends) raises a
*retryable* :class:`~callbrain.llm.base.LLMError`, as a dropped connection
does: before the first chunk a failover moves the turn to the next provider,
after it the turn ends with the fallback line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from typing import Any, Protocol

from callbrain.llm.base import LLMError
from callbrain.llm.chat import ChatChunk

logger = logging.getLogger("callbrain.llm")

END_GRACE_S = 0.25
"""How long, after the provider has said it finished, the rest of its stream may
take to arrive before the response is closed without it."""

_UNREADABLE = (ValueError, LookupError, TypeError, AttributeError)
"""What decoding (UnicodeDecodeError, JSONDecodeError) and reading a wrongly
shaped event (KeyError, TypeError...) raise."""

_END = object()


class EventReader(Protocol):
    """Turns one wire format's events into neutral chunks."""

    @property
    def finished(self) -> bool:
        """Whether the provider has said the answer is over."""

    def feed(self, event: dict[str, Any]) -> Iterable[ChatChunk]:
        """The neutral chunks in one event (may raise on a malformed one)."""

    def end(self) -> Iterable[ChatChunk]:
        """What is left once the events are over (may raise if they ended too early)."""


async def read_events(
    events: AsyncIterable[object], reader: EventReader, *, provider: str
) -> AsyncGenerator[ChatChunk, None]:
    """The neutral chunks of ``events``, until the provider has finished (see the
    module docstring). The caller closes the SDK stream that ``events`` reads."""
    iterator = aiter(events)
    deadline: float | None = None
    try:
        while True:
            if deadline is None and reader.finished:
                deadline = asyncio.get_running_loop().time() + END_GRACE_S
            if deadline is None:
                event = await anext(iterator, _END)
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(iterator, _END)
                except TimeoutError:
                    logger.debug("%s finished but kept the stream open: closed it", provider)
                    break
            if event is _END:
                break
            if not isinstance(event, dict):
                raise TypeError(f"an event that is not a JSON object: {event!r:.60}")
            for chunk in reader.feed(event):
                yield chunk
    except _UNREADABLE as exc:
        raise LLMError(
            f"{provider}: malformed stream: {type(exc).__name__}: {exc}",
            provider=provider,
            retryable=True,
        ) from exc
    for chunk in reader.end():
        yield chunk
