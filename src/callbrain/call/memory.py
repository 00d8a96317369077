"""What a call knows beyond Retell's transcript, kept so a reconnect can go on.

With ``auto_reconnect`` Retell opens a *new* socket for the same call id after a
dropped connection, and behind a load balancer it may reach another instance.
Retell resends the transcript, but not what only we knew: the call object
(and its dynamic variables), the tool calls that ran and what they returned,
the ``agent_interrupt`` numbering and the turn-taking settings we changed.
:class:`CallMemory` is that, and :class:`MemoryKeeper` loads it when a socket
opens and saves it as it changes, through the server's guarded store.

Two rules keep a reconnect from losing anything:

* **Restore first, save after.** Loading a memory puts it back as it was and
  saves nothing; only a change made on this socket is saved. (Saving while
  restoring once wrote an empty tool history over the saved one, and a second
  drop in that window forgot the booking.) When the store could not be read at
  all (down, or slow past its time limit), nothing is written until it can be:
  the keeper reads it again first and hands what it finds to the session to
  merge (``on_restored``), so a stalled store never makes a call forget.
* **Saves are ordered and coalesced.** One writer saves the newest snapshot;
  a burst of changes costs one write, and an older snapshot can never land
  after a newer one. A save the store refused is retried for a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbrain.call.conversation import ToolExchange
from callbrain.llm.chat import ToolCall, ToolOutput
from callbrain.stores.guard import GuardedStore

logger = logging.getLogger("callbrain.call")

_CALL = "call:"
RETRY_FIRST_S = 0.25
RETRY_LAST_S = 4.0
"""A save that fails is tried again after 0.25, 0.5, 1, 2 and 4 s (each bounded by the
store's own time limit), so a store that is paused for a few seconds loses nothing."""


@dataclass
class CallMemory:
    call: dict[str, Any] | None = None
    """The ``call`` object of ``call_details``."""
    tool_history: list[ToolExchange] = field(default_factory=list)
    interrupt_id: int = 0
    """The last ``agent_interrupt`` id sent, so a new socket does not reuse it."""
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    """The ``update_agent`` settings sent, latest value of each."""
    sockets: int = 1
    """How many sockets this call has had: 1, then one more per reconnect."""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "call": self.call,
                "interrupt_id": self.interrupt_id,
                "agent_overrides": self.agent_overrides,
                "sockets": self.sockets,
                "tool_history": [
                    {
                        "anchor": e.anchor,
                        "call": [e.call.id, e.call.name, e.call.arguments],
                        "output": [e.output.content, e.output.is_error],
                    }
                    for e in self.tool_history
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> CallMemory:
        raw = orjson.loads(data)
        history = []
        for entry in raw.get("tool_history") or ():
            call_id, name, arguments = entry["call"]
            content, is_error = entry["output"]
            call = ToolCall(call_id, name, arguments)
            history.append(
                ToolExchange(entry["anchor"], call, ToolOutput(call_id, name, content, is_error))
            )
        return cls(
            call=raw.get("call"),
            tool_history=history,
            interrupt_id=int(raw.get("interrupt_id") or 0),
            agent_overrides=dict(raw.get("agent_overrides") or {}),
            sockets=int(raw.get("sockets") or 1),
        )


class MemoryKeeper:
    """Loads and saves one call's :class:`CallMemory` (see the module docstring).

    Never raises and never blocks the call: a store that fails or hangs costs
    at most the guard's time limit per operation, in the background.
    """

    def __init__(
        self,
        store: GuardedStore,
        call_id: str,
        on_restored: Callable[[CallMemory], None] = lambda memory: None,
    ) -> None:
        self._store = store
        self._key = _CALL + call_id
        self._on_restored = on_restored
        self._pending: CallMemory | None = None
        self._writer: asyncio.Task[None] | None = None
        self.synced = True
        """False while the store has not answered whether this call has a memory."""

    async def load(self) -> CallMemory | None:
        """The memory a previous socket of this call left, if any. None if there
        is none, or if the store failed: then :attr:`synced` is False until a
        later read succeeds (see the module docstring)."""
        ok, data = await self._store.read(self._key)
        if not ok:
            self.synced = False
            logger.warning(
                "could not read the call's memory; it is merged in when the store answers"
            )
        return _parse(data)

    def save(self, memory: CallMemory) -> None:
        """Save ``memory`` in the background; only the newest pending one is written."""
        self._pending = memory
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        delay = RETRY_FIRST_S
        while (memory := self._pending) is not None:
            self._pending = None
            if not self.synced:
                ok, data = await self._store.read(self._key)
                if ok:
                    self.synced = True
                    restored = _parse(data)
                    if restored is not None:
                        self._on_restored(restored)  # saves the merged state: pending again
                    if self._pending is None:
                        self._pending = memory
                    continue
            elif await self._store.set(self._key, memory.to_json()):
                delay = RETRY_FIRST_S
                continue
            if delay > RETRY_LAST_S:
                return  # the store stays down: the guard has logged it; give up on this state
            # The store failed: try again shortly, unless a newer state came meanwhile.
            if self._pending is None:
                self._pending = memory
            await asyncio.sleep(delay)
            delay *= 2

    async def flush(self) -> None:
        """Wait for the saves still pending, for at most twice the store's time
        limit: a call's end must not wait on a store that is down (its retries
        go on in the background)."""
        writer = self._writer
        if writer is not None and not writer.done():
            # asyncio.wait, not await: cancelling the waiter leaves the writer be,
            # so the last state still reaches the store.
            await asyncio.wait({writer}, timeout=2 * self._store.timeout_s)


def _parse(data: bytes | None) -> CallMemory | None:
    if data is None:
        return None
    try:
        return CallMemory.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("the call's saved memory is unreadable (%r); starting afresh", exc)
        return None
