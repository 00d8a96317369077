"""A store in this process: bounded in bytes, expired entries freed as it goes.

Reconnects that come back to the same instance (the usual case with one
instance) find their call here. Entries live in write order, so the least
recently written are at the front: every write first frees the expired
entries there, then the oldest ones while the total is over ``max_bytes``.
Memory is therefore bounded by size, whatever the number of calls or the
size of their transcripts, and an entry nobody reads again is still freed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

_ENTRY_OVERHEAD = 100
"""Bytes counted per entry besides its key and value: the dict slot, the tuple."""


class MemoryStore:
    """The in-process :class:`~callbrain.stores.base.Store`."""

    def __init__(
        self, *, max_bytes: int = 256 * 2**20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """What the entries count for against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        return entry[1]

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        self._write(key, value, ttl_s)

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool:
        if await self.get(key) is not None:
            return False
        self._write(key, value, ttl_s)
        return True

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _write(self, key: str, value: bytes, ttl_s: float) -> None:
        if key in self._entries:
            self._drop(key)
        now = self._clock()
        self._entries[key] = (now + ttl_s, value)
        self._bytes += _cost(key, value)
        self._purge(now)

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (expires, _) = next(iter(entries.items()))
            if expires > now and self._bytes <= self.max_bytes:
                break
            self._drop(key)

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= _cost(key, value)


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + _ENTRY_OVERHEAD
