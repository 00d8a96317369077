"""Where what outlives a socket is kept: calls' memories, side-effecting tools' results.

A dropped call comes back on a new socket, possibly on another instance, and
must find what only we knew. Both kinds of data sit in one
:class:`~callbrain.stores.base.Store` (bytes under keys, each with a time to
live): :class:`~callbrain.stores.memory.MemoryStore` in this process, or
:class:`~callbrain.stores.redis.RedisStore` shared by several, or
:class:`~callbrain.stores.sqlite.SQLiteStore` shared by the worker processes of
one machine. Every use goes
through :class:`~callbrain.stores.guard.GuardedStore`, which holds the one
policy for a store that is slow or down: a time limit on each operation, and
a failure that is logged and counted but never ends a call or holds a frame.
"""

from __future__ import annotations

from callbrain.stores.base import Store
from callbrain.stores.guard import GuardedStore
from callbrain.stores.memory import MemoryStore

__all__ = ["GuardedStore", "MemoryStore", "Store", "open_store"]


def open_store(
    redis_url: str | None,
    *,
    prefix: str = "callbrain:",
    max_bytes: int = 256 * 2**20,
    path: str | None = None,
) -> Store:
    """The store the ``server.store`` settings describe: Redis when a URL is
    given (the ``redis`` extra must be installed), a SQLite file at ``path``,
    else one in this process."""
    if redis_url is None and path is not None:
        from callbrain.stores.sqlite import open_sqlite_store

        return open_sqlite_store(path)
    if redis_url is None:
        return MemoryStore(max_bytes=max_bytes)
    from callbrain.stores.redis import RedisStore

    return RedisStore(redis_url, prefix=prefix)
