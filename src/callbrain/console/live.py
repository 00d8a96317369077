"""The calls in progress on this server, as a call observer, and their changes
as events for the browsers watching the console.

The observer methods run on the event loop in the middle of calls: they keep a
reference to the call and, only when a browser is watching, make one small
summary and hand its bytes to each watcher's queue. Each queue is bounded: a
browser that does not keep up loses its queued events and is sent a fresh
snapshot instead (``resync``), so a slow or stalled browser costs at most its
queue and never slows a call.

The last few calls that ended are kept too (their records are references the
session let go of), so a call just ended can be shown and exported before the
records database has written it, and with recording off.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson

from callbrain.call.record import CallRecord, TurnRecord
from callbrain.records.read import Call, call_from_record
from callbrain.records.settings import Redaction

QUEUE_EVENTS = 256
"""Events a watcher may have waiting before it is resynced instead."""
MAX_WATCHERS = 64
RECENT_CALLS = 20


class Watcher:
    """One browser's bounded queue of events (SSE-encoded bytes)."""

    def __init__(self, size: int) -> None:
        self.events: deque[bytes] = deque()
        self.size = size
        self.lagged = False
        """Events were dropped: the next thing to send is a fresh snapshot."""
        self.wake = asyncio.Event()

    def put(self, event: bytes) -> None:
        if len(self.events) >= self.size:
            self.events.clear()
            self.lagged = True
        else:
            self.events.append(event)
        self.wake.set()

    async def next(self, timeout: float) -> bytes | None:
        """The next event, None on timeout or once it has lagged (then resync)."""
        if not self.events and not self.lagged:
            self.wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self.wake.wait()
            except TimeoutError:
                return None
        if self.lagged or not self.events:
            return None
        return self.events.popleft()


class LiveFeed:
    """A :class:`~callbrain.call.record.CallObserver` for the console (see the module doc)."""

    def __init__(
        self,
        redaction: Redaction = "none",
        *,
        queue_events: int = QUEUE_EVENTS,
        max_watchers: int = MAX_WATCHERS,
        recent_calls: int = RECENT_CALLS,
    ) -> None:
        self.redaction = redaction
        """The records' redaction, so the console shows no more than the database keeps."""
        self.queue_events = queue_events
        self.max_watchers = max_watchers
        self.open: dict[int, CallRecord] = {}
        """Sockets in progress, by ``id()`` of their record (theirs until they end)."""
        self.recent: deque[CallRecord] = deque(maxlen=recent_calls)
        self.watchers: set[Watcher] = set()

    # ------------------------------------------------------------ the observer

    def call_started(self, call: CallRecord) -> None:
        self.open[id(call)] = call
        self._publish(call)

    def turn_started(self, call: CallRecord, turn: TurnRecord) -> None:
        self._publish(call)

    def turn_ended(self, call: CallRecord, turn: TurnRecord) -> None:
        self._publish(call)

    def call_ended(self, call: CallRecord) -> None:
        self.open.pop(id(call), None)
        self.recent.appendleft(call)
        self._publish(call)

    # ---------------------------------------------------------------- reading

    def find(self, call_id: str) -> CallRecord | None:
        """The call's socket in progress, else its latest that ended here lately."""
        for call in self.open.values():
            if call.call_id == call_id:
                return call
        return next((call for call in self.recent if call.call_id == call_id), None)

    def call(self, call_id: str) -> Call | None:
        record = self.find(call_id)
        return None if record is None else call_from_record(record, self.redaction)

    def summary(self, call: CallRecord) -> dict[str, Any]:
        """What the calls list shows of a call, as ``list_calls`` gives it, plus
        ``live`` and ``responding`` (a turn is open)."""
        shaped = call_from_record(call, self.redaction, with_turns=False)
        asked = [t for t in call.turns if t.kind != "begin"]
        firsts = [t.timings_ms()["first_frame"] for t in asked if t.first_frame is not None]
        shaped["turns"] = len(asked)
        shaped["worst_first_frame_ms"] = max((f for f in firsts if f is not None), default=None)
        shaped["live"] = call.end == "open"
        shaped["responding"] = any(t.outcome == "open" for t in call.turns)
        return shaped

    def snapshot(self) -> bytes:
        calls = [self.summary(call) for call in self.open.values()]
        calls.sort(key=lambda c: c["started_at"] or "", reverse=True)
        return _event("snapshot", {"calls": calls})

    # --------------------------------------------------------------- watchers

    def watch(self) -> Watcher | None:
        """A new watcher, or None when ``max_watchers`` are watching already."""
        if len(self.watchers) >= self.max_watchers:
            return None
        watcher = Watcher(self.queue_events)
        self.watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def _publish(self, call: CallRecord) -> None:
        if not self.watchers:
            return  # nobody is looking: nothing to make
        event = _event("call", self.summary(call))
        for watcher in self.watchers:
            watcher.put(event)


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
