"""A bounded mapping whose entries expire: the in-process stores' shared core.

Call memories and tool results must outlive their socket (a reconnect comes
after it is gone) but not the process's memory: entries expire ``ttl_s`` after
their last write and the least recently written go first past ``max_entries``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringDict(Generic[V]):
    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        written_at, value = entry
        if time.monotonic() - written_at > self.ttl_s:
            del self._entries[key]
            return None
        return value

    def put(self, key: str, value: V) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
