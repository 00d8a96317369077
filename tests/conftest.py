"""Fixtures for the remote-backend tests: a module declares which backend with a
``backend`` fixture (or parametrizes it) and gets a running fake and a factory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support import RemoteBackend

from callbrain.llm import LLM
from callbrain.testing.fake_llm import FakeLLMServer
from callbrain.testing.serve import free_port

MakeLLM = Callable[..., Any]

POSTGRES_ADMIN_URL = os.environ.get(
    "CALLBRAIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def _records_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-data")


@pytest.fixture(autouse=True)
def _records_stay_in_tmp(_records_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call records are on by default, in $XDG_DATA_HOME: every app a test starts
    (and every `callbrain` process it runs) writes there, never to the developer's
    own database. One place for the session, so the tables are made once."""
    monkeypatch.setenv("XDG_DATA_HOME", str(_records_home))


@pytest.fixture
def _clean_provider_env(backend: RemoteBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own provider settings must not leak into these tests."""
    for name in backend.env:
        monkeypatch.delenv(name, raising=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: RemoteBackend) -> AsyncIterator[FakeLLMServer]:
    async with backend.fake() as running:
        yield running


@pytest.fixture
def fake(server: FakeLLMServer, _clean_provider_env: None) -> FakeLLMServer:
    server.reset()
    return server


@pytest_asyncio.fixture(loop_scope="module")
async def make_llm(backend: RemoteBackend, fake: FakeLLMServer) -> AsyncIterator[MakeLLM]:
    """Builds the backend against the fake: no retries unless asked, a test key."""
    made: list[LLM] = []

    def make(**overrides: Any) -> Any:
        options = {
            "provider": backend.name,
            "base_url": fake.base_url,
            "api_key": "test-key",
            "max_retries": 0,
            **overrides,
        }
        llm = backend.llm(backend.config.model_validate(options))  # type: ignore[call-arg]
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await llm.aclose()


class RedisServer:
    """A private ``redis-server`` process; :meth:`paused` freezes it like a stalled host."""

    def __init__(self, url: str, process: asyncio.subprocess.Process) -> None:
        self.url = url
        self.process = process

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """SIGSTOP until the block ends: connections stay open, nothing answers."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)


@pytest_asyncio.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A private redis-server on a free port, for this test only."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CALLBRAIN_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and CALLBRAIN_REQUIRE_REDIS=1 (CI)")
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI runs these")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.02)
        yield RedisServer(f"redis://127.0.0.1:{port}/0", proc)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        await proc.wait()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A database of this test's own on the PostgreSQL at 127.0.0.1:5432 (trust
    auth, reached through its ``test`` database), dropped afterwards."""
    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CALLBRAIN_REQUIRE_POSTGRES") == "1":
            pytest.fail(
                f"PostgreSQL is not reachable, and CALLBRAIN_REQUIRE_POSTGRES=1 (CI): {exc}"
            )
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}; CI runs these: {exc}")
    name = f"callbrain_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
