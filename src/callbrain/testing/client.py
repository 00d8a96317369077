"""Play Retell's side of a call over a real WebSocket.

Retell's dashboard cannot test a custom-LLM agent, so this client stands in for
Retell: it connects like Retell does, keeps the live transcript, sends
``update_only`` / ``response_required`` / ``reminder_required`` / ``ping_pong``,
and collects every frame the server sends, grouped by ``response_id``. It works
against any server that speaks the protocol, not only callbrain.

    async with RetellClient.connect("ws://127.0.0.1:8080/llm-websocket") as call:
        await call.expect_config()
        greeting = await call.expect_begin()
        reply = await call.ask("What are your opening hours?")
        assert reply.completes == 1
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from callbrain.retell.frames import PING_INTERVAL_S
from callbrain.testing.checker import ProtocolChecker

Frame = dict[str, Any]


def websocket_url(url: str) -> str:
    """The WebSocket form of a URL as pasted from Retell's dashboard.

    Retell maps ``http(s)://`` to ``ws(s)://`` itself, so either form is accepted;
    anything else is a ``ValueError`` whose message says what is expected.
    """
    for scheme, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(scheme):
            return ws + url.removeprefix(scheme)
    if url.startswith(("ws://", "wss://")):
        return url
    raise ValueError(f"the URL must start with ws://, wss://, http:// or https://, got {url!r}")


def call_url(base_url: str, call_id: str) -> str:
    """Where Retell connects for ``call_id`` given the URL configured in it: the
    call id appended to the path, a query string (``?token=...``) kept after it."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/") + "/" + quote(call_id, safe="")
    return urlunsplit(parts._replace(path=path))


def user(text: str) -> Frame:
    """A caller utterance for a transcript."""
    return {"role": "user", "content": text}


def agent(text: str) -> Frame:
    """An agent utterance for a transcript."""
    return {"role": "agent", "content": text}


@dataclass
class ResponseTurn:
    """Every ``response`` frame the server sent for one ``response_id``."""

    response_id: int
    frames: list[Frame] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(str(f.get("content", "")) for f in self.frames)

    @property
    def completes(self) -> int:
        """How many frames carried ``content_complete: true`` (the protocol wants exactly 1)."""
        return sum(1 for f in self.frames if f.get("content_complete") is True)

    @property
    def complete(self) -> bool:
        return self.completes > 0


class RetellClient:
    """One simulated Retell connection. Create it with :meth:`connect`."""

    def __init__(self, ws: ClientConnection, *, keep_sent: bool = True) -> None:
        self._ws = ws
        self.checker = ProtocolChecker()
        """Every frame in both directions goes through it: protocol violations and
        per-turn timings are in ``checker.violations`` and ``checker.turns``."""
        self.frames: list[Frame] = []
        """Every frame received, in order, parsed from JSON (frames that are not
        JSON objects are only reported by the checker)."""
        self.received_at: list[float] = []
        self.sent: list[Frame] = []
        """Every JSON object frame sent, in order (unless ``keep_sent`` is off: each
        request carries the whole transcript, so a long call's copies add up)."""
        self._keep_sent = keep_sent
        """``time.monotonic()`` when each frame arrived."""
        self.transcript: list[Frame] = []
        self.latest_response_id = 0
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._cursor = 0  # next_frame()'s position in frames
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        self._pinger: asyncio.Task[None] | None = None
        self._last_ping = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        base_url: str,
        call_id: str = "test-call",
        *,
        open_timeout: float = 7.0,
        ping_interval: float | None = None,
        keep_sent: bool = True,
    ) -> AsyncIterator[RetellClient]:
        """Connect to ``{base_url}/{call_id}`` as Retell does (it appends the call id
        to the path; a query string stays at the end, see :func:`call_url`).

        ``ping_interval`` (Retell uses 2 s when ``auto_reconnect`` is on) sends
        ``ping_pong`` in the background; the checker reports late echoes.
        """
        url = call_url(base_url, call_id)
        async with connect(url, open_timeout=open_timeout, max_size=None) as ws:
            client = cls(ws, keep_sent=keep_sent)
            if ping_interval is not None:
                client.start_pinging(ping_interval)
            try:
                yield client
            finally:
                client.stop_pinging()
                client._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client._reader

    # --------------------------------------------------------------- receiving

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                now = time.monotonic()
                frame = self.checker.on_received(message, now)
                if frame is None:
                    continue
                async with self._changed:
                    self.frames.append(frame)
                    self.received_at.append(now)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            async with self._changed:
                self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def wait_for(
        self, predicate: Callable[[list[Frame]], bool], timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(frames)`` holds; TimeoutError if it does not in time."""
        async with asyncio.timeout(timeout), self._changed:
            while not predicate(self.frames):
                if self.closed:
                    raise ConnectionError(f"socket closed (code {self.close_code}) while waiting")
                await self._changed.wait()

    async def next_frame(self, timeout: float = 10.0) -> Frame:
        """The first frame not yet returned by this method."""
        index = self._cursor
        await self.wait_for(lambda frames: len(frames) > index, timeout)
        self._cursor = index + 1
        return self.frames[index]

    def forget_frames(self) -> None:
        """Drop the frames kept so far, for long runs; the checker keeps its counts
        and timings, and :meth:`next_frame` goes on with the next frame to arrive."""
        self.frames.clear()
        self.received_at.clear()
        self._cursor = 0

    def response_turn(self, response_id: int) -> ResponseTurn:
        frames = [
            f
            for f in self.frames
            if f.get("response_type") == "response" and f.get("response_id") == response_id
        ]
        return ResponseTurn(response_id, frames)

    async def response(self, response_id: int, timeout: float = 15.0) -> ResponseTurn:
        """Wait for ``content_complete`` on ``response_id``; record the reply in the transcript."""
        await self.wait_for(lambda _: self.response_turn(response_id).complete, timeout)
        turn = self.response_turn(response_id)
        if response_id == self.latest_response_id and turn.text:
            self.transcript.append(agent(turn.text))
        return turn

    async def expect_config(self, timeout: float = 5.0) -> Frame:
        """The first frame, which must be ``config``."""
        frame = await self.next_frame(timeout)
        if frame.get("response_type") != "config":
            raise AssertionError(f"first frame is not config: {frame}")
        return frame

    async def expect_begin(self, timeout: float = 10.0) -> ResponseTurn:
        """The begin message (``response_id`` 0), added to the transcript if not empty."""
        return await self.response(0, timeout)

    # ----------------------------------------------------------------- sending

    async def send(self, frame: Frame | str | bytes) -> None:
        """Send a frame as is: a dict as JSON text, a str as text, bytes as a binary frame."""
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        # What went out, not the caller's dict: its transcript list keeps changing.
        # A binary frame is no frame of the protocol (servers ignore it): not recorded.
        parsed: object = None
        if isinstance(frame, str):
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(frame)
        # Recorded before the send: a fast server may answer before send() returns.
        if isinstance(parsed, dict):
            if self._keep_sent:
                self.sent.append(parsed)
            self.checker.on_sent(parsed, time.monotonic())
        await self._ws.send(frame)

    async def send_call_details(self, call: Frame) -> None:
        await self.send({"interaction_type": "call_details", "call": call})

    async def update(self, turntaking: str | None = None) -> None:
        """``update_only`` with the current transcript."""
        frame: Frame = {"interaction_type": "update_only", "transcript": self.transcript}
        if turntaking:
            frame["turntaking"] = turntaking
        await self.send(frame)

    async def request(self, *, reminder: bool = False, response_id: int | None = None) -> int:
        """``response_required`` (or ``reminder_required``) for the current transcript."""
        rid = next(self._ids) if response_id is None else response_id
        self.latest_response_id = max(self.latest_response_id, rid)
        kind = "reminder_required" if reminder else "response_required"
        await self.send(
            {"interaction_type": kind, "response_id": rid, "transcript": self.transcript}
        )
        return rid

    async def say(self, text: str) -> int:
        """The caller says ``text``: transcript update, then a response request. Returns its id."""
        self.transcript.append(user(text))
        await self.update(turntaking="agent_turn")
        return await self.request()

    async def ask(self, text: str, timeout: float = 15.0) -> ResponseTurn:
        """:meth:`say`, then wait for the complete reply."""
        return await self.response(await self.say(text), timeout)

    async def remind(self, timeout: float = 15.0) -> ResponseTurn:
        """The caller stays silent: a ``reminder_required``, and its complete reply."""
        return await self.response(await self.request(reminder=True), timeout)

    async def ping(self, timestamp: int | None = None, timeout: float = 5.0) -> float:
        """Send ``ping_pong`` and wait for its echo; returns the round trip in seconds."""
        ts = self._ping_timestamp() if timestamp is None else timestamp
        start = time.monotonic()
        seen = len(self.frames)
        await self.send({"interaction_type": "ping_pong", "timestamp": ts})

        def echoed(frames: list[Frame]) -> bool:
            return any(
                f.get("response_type") == "ping_pong" and f.get("timestamp") == ts
                for f in frames[seen:]
            )

        await self.wait_for(echoed, timeout)
        return time.monotonic() - start

    def start_pinging(self, interval: float = PING_INTERVAL_S) -> None:
        """Send ``ping_pong`` every ``interval`` seconds without waiting for the echo."""
        self.stop_pinging()
        self._pinger = asyncio.create_task(self._ping_every(interval))

    def stop_pinging(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None

    def _ping_timestamp(self) -> int:
        # Retell's timestamps are milliseconds; two pings in one millisecond would
        # share an echo, so the timestamp only ever moves forward.
        self._last_ping = max(int(time.time() * 1000), self._last_ping + 1)
        return self._last_ping

    async def _ping_every(self, interval: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while not self.closed:
                ts = self._ping_timestamp()
                await self.send({"interaction_type": "ping_pong", "timestamp": ts})
                await asyncio.sleep(interval)

    async def close(self) -> None:
        self.stop_pinging()
        await self._ws.close()

    def reset(self) -> None:
        """Lose the connection abruptly, as a network failure does: a TCP reset,
        no close frame (the server sees 1006). Retell reconnects after this; a
        polite :meth:`close` is a hang-up instead."""
        self.stop_pinging()
        transport = self._ws.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: closing sends RST at once instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
