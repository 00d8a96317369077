"""Redis as the store, for several instances behind one load balancer.

A reconnect may land on another instance; with the store in Redis it finds the
call's memory and the results of its side-effecting tools there, and the
``add`` lock keeps two instances from running one booking at once. Every key
expires, so Redis needs no cleaning up. Keys are ``{prefix}{key}``, so one
Redis can serve several deployments (or test runs) side by side.

Needs the ``redis`` extra: ``pip install 'callbrain[redis]'``.
"""

from __future__ import annotations

from callbrain.extras import missing_extra

try:
    import redis.asyncio as redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("redis", "server.store.redis_url") from exc


class RedisStore:
    """The Redis :class:`~callbrain.stores.base.Store`; one connection pool."""

    def __init__(self, url: str, *, prefix: str = "callbrain:") -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(self.prefix + key)
        return None if value is None else value if isinstance(value, bytes) else value.encode()

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        await self.client.set(self.prefix + key, value, px=_ms(ttl_s))

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool:
        return bool(await self.client.set(self.prefix + key, value, px=_ms(ttl_s), nx=True))

    async def delete(self, key: str) -> None:
        await self.client.delete(self.prefix + key)

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
