"""Run a side-effecting tool once per call and arguments, whatever Retell does.

Retell asks for a response as soon as the caller *sounds* finished and throws
it away if they go on talking, so one caller request can reach the model two or
three times; the model may also repeat itself, and a dropped socket replays the
turn. A booking tool must not book twice. Retell's docs say the only real fix
is an idempotency key made from the call id and the tool's arguments, so that is
what :func:`idempotency_key` builds; a repeat gets the stored result.

The store is an interface because a call can move between processes (a
reconnect may land on another instance behind a load balancer): in memory here,
a shared store later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from callbrain.expiring import ExpiringDict


@dataclass(frozen=True, slots=True)
class StoredResult:
    """The outcome of a side-effecting tool's one real run."""

    content: str
    successful: bool


class IdempotencyStore(Protocol):
    """Where results of side-effecting tools are kept, by :func:`idempotency_key`."""

    async def get(self, key: str) -> StoredResult | None: ...

    async def put(self, key: str, result: StoredResult) -> None: ...


def idempotency_key(call_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """``call_id:tool:sha256(arguments)``, the same for the same arguments in any key order."""
    canonical = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS, default=str)
    return f"{call_id}:{tool}:{hashlib.sha256(canonical).hexdigest()}"


class MemoryIdempotencyStore:
    """A bounded, expiring in-process store, shared by the calls of one server.

    Entries outlive the call by ``ttl_s`` (a reconnect can come after the
    socket is gone) and the oldest are evicted past ``max_entries``, so a
    long-running server does not grow without bound.
    """

    def __init__(self, *, ttl_s: float = 6 * 3600, max_entries: int = 100_000) -> None:
        self._entries: ExpiringDict[StoredResult] = ExpiringDict(
            ttl_s=ttl_s, max_entries=max_entries
        )

    async def get(self, key: str) -> StoredResult | None:
        return self._entries.get(key)

    async def put(self, key: str, result: StoredResult) -> None:
        self._entries.put(key, result)

    def __len__(self) -> int:
        return len(self._entries)
