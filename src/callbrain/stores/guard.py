"""The one policy for a store that is slow or down.

A store serves the call, never the other way round: Redis paused for a few
seconds, a network blip or a bug in a custom store must not end a call, hold
back a frame, or keep a session from ending. So every operation here

* runs under one time limit (``timeout_s``), after which it is abandoned;
* never raises: a failure or a timeout gives the operation's neutral answer
  (nothing found, not written), is counted in :attr:`GuardedStore.failures`
  and logged, at most one line per ``log_every_s`` with the count since the
  last one, so a store that is down for everyone cannot flood the log.

What that neutral answer means is the caller's business: a call whose memory
could not be read starts afresh, a tool result that could not be stored is
still given to the model and kept in the call's own history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from callbrain.stores.base import Store

logger = logging.getLogger("callbrain.stores")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 2.0
"""Long enough for any healthy store across a network, short enough that a
caller waiting on it hears a holding line rather than silence."""


class GuardedStore:
    """A :class:`~callbrain.stores.base.Store` behind the time limit and failure policy."""

    def __init__(
        self,
        store: Store,
        *,
        ttl_s: float,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        log_every_s: float = 10.0,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        """How long an entry outlives its last write (longer than any call)."""
        self.timeout_s = timeout_s
        self.failures = 0
        """Operations that failed or timed out since start-up."""
        self._log_every_s = log_every_s
        self._logged_at = -float("inf")
        self._unlogged = 0

    async def get(self, key: str) -> bytes | None:
        """The value; None if there is none or the store failed."""
        return await self._guard("get", key, lambda: self.store.get(key), None)

    async def read(self, key: str) -> tuple[bool, bytes | None]:
        """``(True, value or None)``, or ``(False, None)`` if the store failed: for a
        caller to whom "nothing there" and "could not look" are different things."""
        return await self._guard("get", key, lambda: _found(self.store.get(key)), (False, None))

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Write ``value``; False if the store failed."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        return await self._guard(
            "set", key, lambda: _true(self.store.set(key, value, ttl_s=ttl)), False
        )

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool | None:
        """Write ``value`` if the key is free: True if written, False if taken,
        None if the store failed (the caller decides what that means)."""
        return await self._guard("add", key, lambda: self.store.add(key, value, ttl_s=ttl_s), None)

    async def delete(self, key: str) -> bool:
        """Remove the key; False if the store failed."""
        return await self._guard("delete", key, lambda: _true(self.store.delete(key)), False)

    async def _guard(self, op: str, key: str, work: Callable[[], Awaitable[T]], failed: T) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await work()
        except Exception as exc:
            reason = f"no answer in {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else exc
            self._failed(op, key, reason)
            return failed

    def _failed(self, op: str, key: str, reason: object) -> None:
        self.failures += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self._log_every_s:
            return
        more = f" ({self._unlogged - 1} more since the last report)" if self._unlogged > 1 else ""
        # The key's kind, not the key: it holds the call id and a hash of the arguments.
        logger.warning(
            "store %s of a %s failed: %s; the call goes on without it%s",
            op,
            key.partition(":")[0] or "key",
            reason if isinstance(reason, str) else repr(reason),
            more,
        )
        self._logged_at = now
        self._unlogged = 0


async def _true(work: Awaitable[None]) -> bool:
    await work
    return True


async def _found(work: Awaitable[bytes | None]) -> tuple[bool, bytes | None]:
    return True, await work
