"""Connections that have not finished their handshake: closed after a few
seconds, bounded in number, and answered at once when malformed.

Why this exists: with uvicorn's own protocols, a connection that has not sent a
complete request is never timed out (its keep-alive timer starts only after a
first response), and a WebSocket upgrade that the ``websockets`` library cannot
parse (a request line over 8 KB, more than 128 headers, a body) is never
answered: ``websockets`` prepares its 400/414/431 and closes the stream, but
uvicorn's ``websockets-sansio`` protocol only sends what a parsed request
produces, so those bytes are dropped. Strangers could then hold sockets open
without the socket secret until the process ran out of file descriptors, and
real calls and ``/healthz`` failed.

Two small subclasses of uvicorn's protocols fix that, with one shared rule,
:class:`HalfOpenConnections`: every connection is *half-open* from the moment
it is accepted until its request headers are complete (plain HTTP) or its
WebSocket upgrade has been accepted or refused (a call socket), and again while
a keep-alive connection waits for its next request.

* A half-open connection gets ``handshake_timeout_s`` in all: sending a byte now
  and then does not extend it.
* At most ``max_pending_handshakes`` are half-open at once; one more closes the
  oldest, so a flood cannot use up the file descriptors real calls need, and a
  real handshake (done in one round trip) is not crowded out.
* An endless request head gets a 431 (:data:`MAX_HEAD_BYTES`), and an upgrade that
  ``websockets`` refuses to parse gets its answer (or a 400) at once.
* An upgrade the app refuses with a response of its own (the 404 for a path with
  no call socket) ends the handshake, as a 403 does.

Everything else (routing, frames, keep-alive pings, the close handshake) is
uvicorn's, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from callbrain.server.access import RejectionLimiter

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

logger = logging.getLogger("callbrain.server.handshake")

MAX_HEAD_BYTES = 64 * 1024
"""A request head (request line and headers) still incomplete after this many bytes
gets 431: real ones are a few hundred bytes, and the parser would otherwise keep
any amount of an endless one in memory."""
_EVICTION_KEY = "max_pending_handshakes"
"""One rate limit for eviction lines, whoever was evicted: it is a server-wide state."""


def http_error(status: HTTPStatus, text: str) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "an unknown peer"


class HalfOpenConnections:
    """The connections still in their handshake, oldest first, each with a deadline
    (see the module docstring)."""

    def __init__(self, timeout_s: float, limit: int, rejections_per_minute: int) -> None:
        self.timeout_s = timeout_s
        self.limit = limit
        self.limiter = RejectionLimiter(rejections_per_minute)
        self._deadlines: OrderedDict[asyncio.BaseTransport, asyncio.TimerHandle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._deadlines)

    def opened(self, transport: asyncio.BaseTransport) -> None:
        """``transport`` is waiting for a request: start its clock."""
        if transport in self._deadlines:
            return
        while len(self._deadlines) >= self.limit:
            oldest, timer = self._deadlines.popitem(last=False)
            timer.cancel()
            self.log(
                _EVICTION_KEY,
                logging.WARNING,
                "more than %d connections were waiting on a handshake "
                "(server.access.max_pending_handshakes): closed the oldest, from %s",
                self.limit,
                peer_host(oldest),
            )
            oldest.close()
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, transport)
        self._deadlines[transport] = timer

    def completed(self, transport: asyncio.BaseTransport) -> None:
        """``transport`` has finished its handshake, or is gone."""
        timer = self._deadlines.pop(transport, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._deadlines.pop(transport, None)
        host = peer_host(transport)
        self.log(
            host,
            logging.INFO,
            "closed a connection from %s: no complete handshake within %g s "
            "(server.access.handshake_timeout_s)",
            host,
            self.timeout_s,
        )
        transport.close()

    def log(self, key: str, level: int, message: str, *args: Any) -> None:
        """Log within ``rejections_per_minute`` per ``key``, as refused sockets are."""
        verdict = self.limiter.hit(key)
        if verdict == "log":
            logger.log(level, message, *args)
        elif verdict == "suppress":
            logger.log(level, "further lines about %s this minute are not logged", key)


class HandshakeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size limit on request heads."""

    half_open: ClassVar[HalfOpenConnections]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = None
        """Bytes of the request head received so far; None outside a head."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.half_open.opened(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.half_open.completed(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        self._head_bytes += len(data)  # all of it: the head is not over yet
        if self._head_bytes > MAX_HEAD_BYTES:
            host = peer_host(self.transport)
            self.half_open.log(
                host, logging.WARNING, "refused a request head over %d bytes from %s",
                MAX_HEAD_BYTES, host,
            )  # fmt: skip
            self.transport.write(
                http_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request head too large\n")
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()
        # An upgrade stays half-open until the WebSocket protocol accepts or refuses it.
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self.half_open.completed(self.transport)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle until the next request
            self.half_open.opened(self.transport)


class HandshakeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, answering the upgrades it cannot parse."""

    half_open: ClassVar[HalfOpenConnections]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (
            not self.handshake_initiated
            and self.conn.handshake_exc is not None
            and not self.transport.is_closing()
        ):
            self._refuse_unparsable()

    def _refuse_unparsable(self) -> None:
        # websockets has prepared a 414 or 431, or (for any other flaw) only the end
        # of the stream: then the answer is ours.
        answer = b"".join(self.conn.data_to_send()) or http_error(
            HTTPStatus.BAD_REQUEST, "Not a valid WebSocket handshake\n"
        )
        host = peer_host(self.transport)
        self.half_open.log(
            host, logging.WARNING, "refused a malformed WebSocket handshake from %s: %s",
            host, self.conn.handshake_exc,
        )  # fmt: skip
        self.handshake_complete = self.close_sent = True  # nothing more to send
        self.transport.write(answer)
        self.transport.close()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # A refusal with a response of the app's own (a 404) has been sent; uvicorn
            # does not count that as the end of the handshake and would log an error.
            self.handshake_complete = True
        if self.handshake_complete:  # accepted (or refused) by the app
            self.half_open.completed(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.half_open.completed(self.transport)
        super().connection_lost(exc)


def handshake_protocols(
    half_open: HalfOpenConnections,
) -> tuple[type[HandshakeHttpProtocol], type[HandshakeWebSocketProtocol]]:
    """The HTTP and WebSocket protocol classes for one server, sharing ``half_open``
    (uvicorn builds protocols from a class, so the state rides on subclasses)."""
    http = type("CallbrainHttpProtocol", (HandshakeHttpProtocol,), {"half_open": half_open})
    ws = type("CallbrainWebSocketProtocol", (HandshakeWebSocketProtocol,), {"half_open": half_open})
    return http, ws
