"""Server-Sent Events read straight from the response bytes, for both SDKs' streams.

The official SDK still sends the request (its retries, its errors for a bad
status, its connection pool); only the reading of the body is ours. Why: in a
profile of the server at 1,000 calls (docs/performance.md), the SDK's SSE
decoder and stream took 15% of the server's CPU. It is general (any line
ending, any field, one regex match and one ``bytearray`` copy per line, one
``ServerSentEvent`` per event, then ``json.loads`` of a decoded ``str``); a
chat completion's events are one ``data:`` line each, so splitting the bytes
on blank lines and handing each payload to ``orjson`` does the same work in a
few C calls per network read. Anthropic's SDK decodes the same way.

What the SDKs' streams do that these keep. OpenAI: ``data: [DONE]`` ends the
answer and the rest of the body is drained briefly so an HTTP/1.1 connection
can go back to the pool; an event carrying ``error`` raises
:class:`openai.APIError`. Anthropic: ``ping`` events are skipped and an
``error`` event raises :class:`anthropic.APIStatusError` with the response's
status, as its SDK does (every event's JSON names its own ``type``, so the
``event:`` line is not needed). Both: a failure while reading the body is a
connection error (retryable); the response is closed however the stream ends. Lines may
end in LF, CRLF or CR; ``event:``, ``id:``, ``retry:`` and comment lines are
ignored (chat completions send none that matter); a payload spread over
several ``data:`` lines is joined with newlines, as the SSE standard says.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import openai
import orjson

_DRAIN_S = 0.1
"""How long the rest of the body may take after ``[DONE]`` before the response
is closed rather than drained (the SDK allows the same)."""


def data_of(event: bytes) -> bytes | None:
    """The payload of one event (its lines without the blank line after
    them), or None if it has no ``data:`` line."""
    if event.startswith(b"data: ") and b"\n" not in event:  # nearly every event
        return event[6:]
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None


def _lf(chunk: bytes) -> bytes:
    """CRLF and CR line endings as LF."""
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in chunk else chunk


async def event_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The payload of every event in a byte stream, as the events complete."""
    pending = b""
    unfinished: list[bytes] = []  # reads with no line end in them, joined once one comes
    async for chunk in chunks:
        if b"\n" not in chunk and b"\r" not in chunk:
            unfinished.append(chunk)  # a long line in many reads stays linear
            continue
        if pending or unfinished:
            chunk = b"".join((pending, *unfinished, chunk))
            unfinished.clear()
        # A CR at the end may be half of a CRLF: it waits for the next read.
        held = b"\r" if chunk.endswith(b"\r") else b""
        *events, pending = _lf(chunk[:-1] if held else chunk).split(b"\n\n")
        pending += held
        for event in events:
            if (data := data_of(event)) is not None:
                yield data
    # The body ended: a trailing CR ends a line, and a last event may lack its blank line.
    for event in _lf(b"".join((pending, *unfinished))).split(b"\n\n"):
        if (data := data_of(event.strip(b"\n"))) is not None:
            yield data


class OpenAIEvents(openai.AsyncStream[object]):
    """The SDK's stream class with the body read by :func:`event_data` (see the
    module docstring). Each item is the decoded JSON of one event."""

    async def __stream__(self) -> AsyncIterator[object]:
        response = self.response
        chunks = _body(response, openai.APITimeoutError, openai.APIConnectionError)
        try:
            async for data in event_data(chunks):
                if data.startswith(b"[DONE]"):
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(_DRAIN_S):
                            async for _ in chunks:
                                pass
                    return
                event: Any = orjson.loads(data)
                if isinstance(event, dict) and event.get("error"):
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else None
                    raise openai.APIError(
                        message if isinstance(message, str) and message else "stream error",
                        response.request,
                        body=error,
                    )
                yield event
        finally:
            await response.aclose()


class AnthropicEvents(anthropic.AsyncStream[object]):
    """The Anthropic SDK's stream class with the body read by :func:`event_data`
    (see the module docstring). Each item is the decoded JSON of one event."""

    async def __stream__(self) -> AsyncIterator[object]:
        response = self.response
        chunks = _body(response, anthropic.APITimeoutError, anthropic.APIConnectionError)
        try:
            async for data in event_data(chunks):
                event: Any = orjson.loads(data)
                kind = event.get("type") if isinstance(event, dict) else None
                if kind == "ping":
                    continue
                if kind == "error":
                    raise anthropic.APIStatusError(f"{event}", response=response, body=event)
                yield event
        finally:
            await response.aclose()


async def _body(
    response: Any,
    timeout_error: Callable[..., Exception],
    connection_error: Callable[..., Exception],
) -> AsyncIterator[bytes]:
    """The body's bytes; a failure to read them is the SDK's connection error."""
    request = response.request
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except TimeoutError as exc:
        raise timeout_error(request=request) from exc
    except Exception as exc:  # whatever the transport raises: the connection failed
        raise connection_error(request=request) from exc
