"""A store in one SQLite file, shared by the worker processes of one machine.

``callbrain serve --workers N`` runs N processes on one port; a call's reconnect
may land on any of them, so without Redis they need a store they all see: this
one. SQLite in WAL mode lets the workers read while one writes, an ``INSERT OR
IGNORE`` is the same atomic set-if-absent that Redis's ``SET NX`` is (the run
lock of side-effecting tools), and every row carries its expiry, so expired
rows are skipped on read and deleted a few at a time on write.

The file is the workers' only: local disk, one machine. Several machines need
Redis (``server.store.redis_url``).

Each operation runs on the store's own thread (SQLite is a blocking library,
and one connection on one thread is what it likes best), under the busy
timeout; the guard's time limit (:mod:`callbrain.stores.guard`) bounds the wait
as for any store. A process's operations run one after another: each takes
tens of microseconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from callbrain.errors import StartupError

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL NOT NULL
)
"""
_PURGE_EVERY = 100
"""Writes between two deletions of expired rows."""
_PURGE_LIMIT = 500


class SQLiteStore:
    """The :class:`~callbrain.stores.base.Store` of one machine's workers."""

    def __init__(self, path: str | Path, *, busy_s: float = 2.0) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_s * 1000)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "callbrain-sqlite-store")
        self._connection: sqlite3.Connection | None = None
        self._writes = 0
        # Fail now, with the reason, if the file cannot be used.
        self._thread.submit(self._connect).result()

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            connection.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")  # a crash loses the last writes only
            connection.execute(_SCHEMA)
            self._connection = connection
        return self._connection

    async def _on_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._thread.submit(work))

    async def _run(self, sql: str, *args: object) -> tuple[object, ...] | None:
        """Run ``sql``; its first row, read on the store's thread."""
        return await self._on_thread(lambda: self._connect().execute(sql, args).fetchone())

    async def get(self, key: str) -> bytes | None:
        row = await self._run(
            "SELECT value FROM entries WHERE key = ? AND expires > ?", key, time.time()
        )
        if row is None:
            return None
        value = row[0]
        return value if isinstance(value, bytes) else bytes(str(value), "utf-8")

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        await self._run(
            "INSERT OR REPLACE INTO entries (key, value, expires) VALUES (?, ?, ?)",
            key,
            value,
            time.time() + ttl_s,
        )
        await self._wrote()

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool:
        now = time.time()
        added = await self._on_thread(lambda: self._add(key, value, now, now + ttl_s))
        await self._wrote()
        return added

    def _add(self, key: str, value: bytes, now: float, expires: float) -> bool:
        connection = self._connect()
        # One transaction: the expired row goes and the new one comes in, or not at all.
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("DELETE FROM entries WHERE key = ? AND expires <= ?", (key, now))
            cursor = connection.execute(
                "INSERT OR IGNORE INTO entries (key, value, expires) VALUES (?, ?, ?)",
                (key, value, expires),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return cursor.rowcount == 1

    async def delete(self, key: str) -> None:
        await self._run("DELETE FROM entries WHERE key = ?", key)

    async def _wrote(self) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            await self._run(
                "DELETE FROM entries WHERE key IN "
                "(SELECT key FROM entries WHERE expires <= ? LIMIT ?)",
                time.time(),
                _PURGE_LIMIT,
            )

    async def ping(self) -> None:
        await self._run("SELECT 1")

    async def aclose(self) -> None:
        def close() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await self._on_thread(close)
        self._thread.shutdown(wait=False)


def open_sqlite_store(path: str | Path) -> SQLiteStore:
    """The store at ``path`` (``~`` expanded, its folder made), or a
    :class:`~callbrain.errors.StartupError` saying why the file cannot be used."""
    where = Path(path).expanduser()
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(where)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(
            f"server.store.path: cannot use {where} as the store ({exc}); "
            "choose a file on a local disk the server may write"
        ) from exc
