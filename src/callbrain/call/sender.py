"""The one way a call's frames reach the socket.

Every frame goes through :class:`Sender`, under one lock, so two rules hold
whoever sends (a turn, a tool's bookkeeping, a pong, a background job):

* a ``response`` frame goes out only while the
  :class:`~callbrain.retell.ledger.ResponseLedger` says its id may speak, and a
  ``content_complete`` is recorded there at once, so no superseded id is ever
  heard and no id completes twice;
* a frame that cannot be built (a bad action value, text that is not valid
  UTF-8) is a bug, logged and skipped; a final frame is then rebuilt without
  what broke it, so the live id still gets its ``content_complete``: dead air
  is the worse outcome.

A socket that fails under a write marks the call closed (nothing more is
sent); the read loop sees the close next and ends the session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from callbrain.call.state import CallState, Lifecycle
from callbrain.retell.frames import OutboundFrame, ResponseFrame, encode
from callbrain.retell.ledger import ResponseLedger

logger = logging.getLogger("callbrain.call")


class Transport(Protocol):
    """The socket as a call sees it; the server adapts Starlette's WebSocket to it."""

    close_code: int | None
    """How the peer closed, once :meth:`receive` has returned None (None if unknown)."""

    async def receive(self) -> str | bytes | None:
        """The next frame (text or binary), or None once the peer has gone."""

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int) -> None: ...


class Sender:
    """Writes one call's frames (see the module docstring)."""

    def __init__(self, transport: Transport, ledger: ResponseLedger, lifecycle: Lifecycle) -> None:
        self._transport = transport
        self._ledger = ledger
        self._lifecycle = lifecycle
        self._lock = asyncio.Lock()

    async def response(
        self,
        response_id: int,
        content: str,
        *,
        complete: bool,
        fields: dict[str, Any] | None = None,
    ) -> bool:
        """Send content for ``response_id`` if it may still speak; True if sent.

        ``fields`` are the frame's optional flags (actions, no_interruption_allowed).
        """
        async with self._lock:
            if self._lifecycle.closed or not self._ledger.may_send(response_id):
                return False
            text = _response_text(response_id, content, complete, fields or {})
            if text is None or not await self._write(text, "response"):
                return False
            if complete:
                self._ledger.complete(response_id)
            return True

    async def frame(self, frame: OutboundFrame) -> bool:
        """Send a frame that belongs to no response (config, pong, tool
        bookkeeping, agent_interrupt, update_agent, metadata); True if it went out."""
        async with self._lock:
            if self._lifecycle.closed:
                return False
            try:
                text = encode(frame)
            except Exception:
                logger.exception("could not encode a %s frame; not sent", frame.response_type)
                return False
            return await self._write(text, frame.response_type)

    async def _write(self, text: str, kind: str) -> bool:
        # Called with the lock held.
        try:
            await self._transport.send_text(text)
        except Exception as exc:
            self._lifecycle.to(CallState.CLOSED)
            logger.info("socket closed while sending %s: %r", kind, exc)
            return False
        return True


def _response_text(
    response_id: int, content: str, complete: bool, fields: dict[str, Any]
) -> str | None:
    """The ``response`` frame's text, rebuilt without its extras (then without its
    text) when a final frame cannot be built; None when nothing can be sent."""
    if not fields and type(content) is str and type(response_id) is int and type(complete) is bool:
        # The frame of almost every chunk: its three fields are typed by now, so
        # it is written directly (a tenth of the cost of building the model).
        try:
            return orjson.dumps(
                {
                    "response_type": "response",
                    "response_id": response_id,
                    "content": content,
                    "content_complete": complete,
                }
            ).decode()
        except orjson.JSONEncodeError:
            pass  # not valid UTF-8: cleaned below
    attempts = [(content, fields)]
    # Text that is not valid UTF-8 (a lone surrogate from a model or a tool): say
    # the rest of it rather than nothing.
    clean = content.encode("utf-8", "ignore").decode("utf-8")
    if clean != content:
        logger.warning("response %d: dropped characters that are not valid text", response_id)
        attempts = [(clean, fields)]
    if complete:
        attempts += [(attempts[0][0], {}), ("", {})]
    for text, extra in attempts:
        try:
            return encode(
                ResponseFrame(
                    response_id=response_id, content=text, content_complete=complete, **extra
                )
            )
        except Exception:
            logger.exception(
                "response %d: could not build a frame%s",
                response_id,
                "; sending it without its extras" if complete else "; not sent",
            )
    return None
