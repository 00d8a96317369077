"""Run a side-effecting tool once per call and arguments, whatever Retell does.

Retell asks for a response as soon as the caller *sounds* finished and throws
it away if they go on talking, so one caller request can reach the model two or
three times; the model may also repeat itself, and a dropped socket replays the
turn. A booking tool must not book twice. Retell's docs say the only real fix
is an idempotency key made from the call id and the tool's arguments, so that is
what :func:`idempotency_key` builds; a repeat gets the stored result.

Results live in the server's store (:mod:`callbrain.stores`), in this process
or in Redis, so a reconnect that lands on another instance finds them too.

A result is only stored once the run is over, so a run still *in progress* on
one instance is invisible there: a reconnect landing on another instance
during a booking would book again. :meth:`ResultStore.claim` closes that
window with a lock in the shared store (``lock:`` + the key, set only if
absent): the instance that takes it runs the tool; another one waits for the
result (or for the lock to go, when the run failed there and may be tried
again). The lock expires by itself, so an instance that dies mid-run blocks
nobody for longer than the tool's timeout and a margin.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from callbrain.stores.guard import GuardedStore

_RESULT = "result:"
_LOCK = "lock:"
POLL_S = 0.1
"""How often an instance waiting for another's run looks for its result."""

Claim = Literal["mine", "taken", "unavailable"]


@dataclass(frozen=True, slots=True)
class StoredResult:
    """The outcome of a side-effecting tool's one real run."""

    content: str
    successful: bool

    def to_json(self) -> bytes:
        return orjson.dumps({"content": self.content, "successful": self.successful})

    @classmethod
    def from_json(cls, data: bytes) -> StoredResult:
        raw = orjson.loads(data)
        return cls(content=str(raw["content"]), successful=bool(raw["successful"]))


def idempotency_key(call_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """``call_id:tool:sha256(arguments)``, the same for the same arguments in any key order."""
    canonical = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS, default=str)
    return f"{call_id}:{tool}:{hashlib.sha256(canonical).hexdigest()}"


class ResultStore:
    """Side-effecting tools' results by :func:`idempotency_key`, in the guarded store.

    A failing store answers "nothing stored" and "not written" (see
    :mod:`callbrain.stores.guard`); the runner still has the call's own history.
    """

    def __init__(self, store: GuardedStore) -> None:
        self.store = store

    async def get(self, key: str) -> StoredResult | None:
        data = await self.store.get(_RESULT + key)
        if data is None:
            return None
        try:
            return StoredResult.from_json(data)
        except (ValueError, KeyError, TypeError):
            return None  # written by something else under our prefix: not ours to trust

    async def put(self, key: str, result: StoredResult) -> bool:
        return await self.store.set(_RESULT + key, result.to_json())

    async def claim(self, key: str, *, hold_s: float) -> Claim:
        """Take the run lock for ``key`` for at most ``hold_s`` seconds: ``mine``
        (run it), ``taken`` (someone runs it: :meth:`wait` for it) or
        ``unavailable`` (the store failed: nobody can tell)."""
        taken = await self.store.add(_LOCK + key, b"1", ttl_s=hold_s)
        return "unavailable" if taken is None else "mine" if taken else "taken"

    async def release(self, key: str) -> None:
        await self.store.delete(_LOCK + key)

    async def wait(self, key: str, *, until: float) -> StoredResult | None:
        """The result of a run held by someone else, once it is stored; None when
        the lock goes without a result (that run failed) or at ``until`` (loop time).

        Polled: a shared store has no event that crosses instances cheaply, and
        this path is rare (a reconnect during a side-effecting run).
        """
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            stored = await self.get(key)
            if stored is not None:
                return stored
            if await self.store.get(_LOCK + key) is None and await self.get(key) is None:
                return None
            await asyncio.sleep(POLL_S)
        return None
