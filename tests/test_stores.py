"""The stores and their one policy: bounded in memory, shared in Redis, and never
in the way of a call when they fail or hang."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from callbrain.call.conversation import ToolExchange
from callbrain.call.memory import CallMemory, MemoryKeeper
from callbrain.llm.chat import ToolCall, ToolOutput
from callbrain.stores import GuardedStore, MemoryStore
from callbrain.stores.redis import RedisStore
from callbrain.stores.sqlite import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HangingStore(MemoryStore):
    """Answers nothing until released: a paused Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return await super().get(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        await super().set(key, value, ttl_s=ttl_s)


class BrokenStore(MemoryStore):
    async def get(self, key: str) -> bytes | None:
        raise ConnectionError("connection refused")

    async def set(self, key: str, value: bytes, *, ttl_s: float) -> None:
        raise ConnectionError("connection refused")

    async def add(self, key: str, value: bytes, *, ttl_s: float) -> bool:
        raise ConnectionError("connection refused")


def sample_memory() -> CallMemory:
    return CallMemory(
        call={"call_id": "c", "retell_llm_dynamic_variables": {"name": "José"}},
        tool_history=[
            ToolExchange(
                3,
                ToolCall("t1", "book", '{"day":"tuesday"}'),
                ToolOutput("t1", "book", "Booked.", False),
            )
        ],
        interrupt_id=2,
        agent_overrides={"responsiveness": 0.5},
        sockets=2,
    )


async def test_memory_store_frees_expired_entries_on_later_writes() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.set("a", b"x" * 100, ttl_s=10)
    await store.set("b", b"y", ttl_s=10)
    clock.now += 11
    # Nobody reads "a" or "b" again; the next write still frees them.
    await store.set("c", b"z", ttl_s=10)
    assert len(store) == 1 and await store.get("c") == b"z"
    assert store.size_bytes < 200


async def test_memory_store_is_bounded_by_bytes_not_count() -> None:
    store = MemoryStore(max_bytes=10_000)
    for i in range(50):
        await store.set(f"call:{i}", b"t" * 900, ttl_s=3600)
    assert store.size_bytes <= 10_000
    assert await store.get("call:0") is None  # oldest written went first
    assert await store.get("call:49") == b"t" * 900


async def test_memory_store_add_is_a_lock_until_it_expires_or_is_deleted() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    assert await store.add("lock:k", b"1", ttl_s=5)
    assert not await store.add("lock:k", b"2", ttl_s=5)
    await store.delete("lock:k")
    assert await store.add("lock:k", b"3", ttl_s=5)
    clock.now += 6
    assert await store.add("lock:k", b"4", ttl_s=5)


async def test_the_guard_gives_up_on_a_hanging_store_without_raising() -> None:
    hanging = HangingStore()
    guard = GuardedStore(hanging, ttl_s=60, timeout_s=0.05)
    assert await guard.get("call:x") is None
    assert await guard.set("call:x", b"1") is False
    assert guard.failures == 2


async def test_the_guard_logs_a_failing_store_once_per_window_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = GuardedStore(BrokenStore(), ttl_s=60, log_every_s=3600)
    with caplog.at_level(logging.WARNING, logger="callbrain.stores"):
        for _ in range(5):
            assert await guard.get("result:secret-call-id:book:abc") is None
        assert await guard.add("lock:k", b"1", ttl_s=1) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "store get of a result failed" in lines[0]
    assert "secret-call-id" not in lines[0]  # the kind of key, never the key
    assert guard.failures == 6


async def test_call_memory_round_trips_through_the_keeper() -> None:
    store = GuardedStore(MemoryStore(), ttl_s=60)
    keeper = MemoryKeeper(store, "c")
    memory = sample_memory()
    keeper.save(memory)
    await keeper.flush()
    assert await MemoryKeeper(store, "c").load() == memory
    memory.interrupt_id = 9  # saved as it was, not as it is now
    loaded = await MemoryKeeper(store, "c").load()
    assert loaded is not None and loaded.interrupt_id == 2


async def test_the_keeper_writes_the_newest_snapshot_and_never_an_older_one_after_it() -> None:
    hanging = HangingStore()
    store = GuardedStore(hanging, ttl_s=60, timeout_s=5)
    keeper = MemoryKeeper(store, "c")
    keeper.save(CallMemory(interrupt_id=1))
    await hanging.entered.wait()  # the writer took the first snapshot and hangs on it
    for interrupt_id in range(2, 6):
        keeper.save(CallMemory(interrupt_id=interrupt_id))
    hanging.release.set()
    await keeper.flush()
    loaded = await MemoryKeeper(store, "c").load()
    assert loaded is not None and loaded.interrupt_id == 5
    assert hanging.calls == 2 + 1  # the first, the newest, then the load


async def test_an_unreadable_memory_starts_the_call_afresh() -> None:
    backend = MemoryStore()
    await backend.set("call:c", b"not json", ttl_s=60)
    assert await MemoryKeeper(GuardedStore(backend, ttl_s=60), "c").load() is None


async def test_redis_store_uses_its_prefix_expires_and_locks(redis_url: str) -> None:
    first = RedisStore(redis_url, prefix="test-a:")
    other = RedisStore(redis_url, prefix="test-b:")
    try:
        await first.set("call:1", b"one", ttl_s=60)
        assert await first.get("call:1") == b"one"
        assert await other.get("call:1") is None  # another deployment's keys
        assert await first.add("lock:k", b"1", ttl_s=60)
        assert not await first.add("lock:k", b"2", ttl_s=60)
        await first.delete("lock:k")
        assert await first.add("lock:k", b"3", ttl_s=0.05)
        keys = await first.client.keys("test-a:*")
        assert sorted(keys) == [b"test-a:call:1", b"test-a:lock:k"]
        assert 0 < await first.client.pttl("test-a:lock:k") <= 50
    finally:
        await first.client.delete(*await first.client.keys("test-*"))
        await first.aclose()
        await other.aclose()


async def test_the_sqlite_store_is_shared_by_processes_and_locks_like_redis(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    first, second = SQLiteStore(path), SQLiteStore(path)  # two workers' connections
    try:
        await first.set("call:1", b"one", ttl_s=60)
        assert await second.get("call:1") == b"one"
        assert await first.add("lock:k", b"1", ttl_s=60)
        assert not await second.add("lock:k", b"2", ttl_s=60)
        await second.delete("lock:k")
        assert await first.add("lock:k", b"3", ttl_s=0.01)
        await asyncio.sleep(0.02)  # let the lock expire: then it is free again
        assert await second.add("lock:k", b"4", ttl_s=60)
        assert await first.get("lock:k") == b"4"
        await first.set("gone", b"x", ttl_s=0)
        assert await second.get("gone") is None
    finally:
        await first.aclose()
        await second.aclose()


def test_the_sqlite_store_is_one_file_for_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    script = (
        "import asyncio, sys\n"
        "from callbrain.stores.sqlite import SQLiteStore\n"
        "async def main():\n"
        "    store = SQLiteStore(sys.argv[1])\n"
        "    won = await store.add('lock:race', sys.argv[2].encode(), ttl_s=60)\n"
        "    print('won' if won else 'lost')\n"
        "    await store.aclose()\n"
        "asyncio.run(main())\n"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(n)], stdout=subprocess.PIPE)
        for n in range(6)
    ]
    results = [run.communicate(timeout=60)[0].decode().strip() for run in runs]
    assert sorted(results) == ["lost"] * 5 + ["won"]
