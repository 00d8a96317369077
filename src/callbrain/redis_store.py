"""Redis behind the call store and the idempotency store, for several instances.

A reconnect may land on another instance behind the load balancer; with both
stores in Redis it finds the call's memory and the results of its
side-effecting tools there, so the model neither forgets nor books twice.
Every key expires (``ttl_s``), so Redis needs no cleaning up.

What Redis does not share is a side-effecting tool *still running* on the old
instance when the new one is asked the same: each instance runs at most one at
a time for a call and arguments, but two instances could each run one. The
window is a reconnect that arrives while the booking is in flight.
"""

from __future__ import annotations

import orjson
import redis.asyncio as redis

from callbrain.call_store import CALL_TTL_S, CallMemory
from callbrain.tools.idempotency import StoredResult

_PREFIX = "callbrain:"


class RedisStores:
    """One connection pool, two stores: ``calls`` and ``results``."""

    def __init__(self, url: str, *, ttl_s: float = CALL_TTL_S) -> None:
        self.client: redis.Redis = redis.Redis.from_url(url)
        self.ttl_ms = int(ttl_s * 1000)
        self.calls = RedisCallStore(self)
        self.results = RedisIdempotencyStore(self)

    async def ping(self) -> None:
        """Fail at start-up, with the reason, if Redis cannot be reached."""
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisCallStore:
    def __init__(self, stores: RedisStores) -> None:
        self._stores = stores

    async def load(self, call_id: str) -> CallMemory | None:
        data = await self._stores.client.get(_PREFIX + "call:" + call_id)
        return None if data is None else CallMemory.from_json(data)

    async def save(self, call_id: str, memory: CallMemory) -> None:
        key = _PREFIX + "call:" + call_id
        await self._stores.client.set(key, memory.to_json(), px=self._stores.ttl_ms)


class RedisIdempotencyStore:
    def __init__(self, stores: RedisStores) -> None:
        self._stores = stores

    async def get(self, key: str) -> StoredResult | None:
        data = await self._stores.client.get(_PREFIX + "result:" + key)
        if data is None:
            return None
        raw = orjson.loads(data)
        return StoredResult(content=raw["content"], successful=raw["successful"])

    async def put(self, key: str, result: StoredResult) -> None:
        data = orjson.dumps({"content": result.content, "successful": result.successful})
        await self._stores.client.set(_PREFIX + "result:" + key, data, px=self._stores.ttl_ms)
