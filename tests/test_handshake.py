"""Connections that never finish their handshake, over raw sockets to a real server.

Half-open connections must be closed by the server (each test waits for the end
of the stream, with a generous bound, and never measures how fast), malformed
upgrades must get an HTTP error at once, and a flood of half-open connections
must not stop a real call or ``/healthz``, even at a low open-file limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callbrain.agent import Agent
from callbrain.llm.config import OpenAIConfig
from callbrain.server.process import raise_open_file_limit
from callbrain.server.settings import AccessSettings, ServerSettings
from callbrain.testing import FakeOpenAIServer, Reply, RetellClient, serve_agent
from callbrain.testing.serve import free_port

CLOSED_WITHIN = 20.0
"""The bound on waiting for the server to close a socket: generous, never a measure."""
LONG = 600.0
"""A handshake timeout no test waits for: what happens sooner is not its doing."""

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def upgrade(path: str = "/llm-websocket/c1", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(default=Reply("Still here.")) as server:
        yield server


def make_agent(fake: FakeOpenAIServer, **access: Any) -> Agent:
    llm = OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="sk-test", max_retries=0)
    server = ServerSettings(access=AccessSettings.model_validate(access))
    return Agent(name="edge", begin_message="Hi.", llm=llm, server=server)


async def open_raw(url: str, data: bytes = b"") -> Stream:
    host, _, port = url.split("://")[1].split("/")[0].partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def read_until_closed(stream: Stream) -> bytes:
    """Everything the server sends until it closes the connection."""
    reader, _ = stream
    try:
        return await asyncio.wait_for(reader.read(), CLOSED_WITHIN)
    except ConnectionResetError:  # closed with our unread bytes in its buffer
        return b""


async def drip(writer: asyncio.StreamWriter) -> None:
    """A slowloris: one more header byte now and then, for ever."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)  # the client's slowness, not a wait on the server


async def test_half_open_connections_are_closed_and_calls_are_not(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callbrain.server.handshake")
    agent = make_agent(fake, handshake_timeout_s=0.5)
    async with serve_agent(agent) as url, RetellClient.connect(url, "c1") as call:
        await call.expect_config()
        await call.expect_begin()
        silent = await open_raw(url)
        slowloris = await open_raw(url, upgrade()[:40])
        # A kept-alive connection after a first answer, then a request that never ends.
        kept = await open_raw(url, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        await kept[0].readuntil(b'"active_calls":1}')
        kept[1].write(b"GET /healthz HTTP/1.1\r\nHo")
        drips = [asyncio.create_task(drip(slowloris[1])), asyncio.create_task(drip(kept[1]))]
        try:
            closed = await asyncio.gather(*map(read_until_closed, (silent, slowloris, kept)))
        finally:
            for task in drips:
                task.cancel()
        assert closed[:2] == [b"", b""]  # nothing was ever answered: just closed
        # The call opened before them all is well past the deadline, and goes on.
        assert (await call.ask("Are you there?")).text == "Still here."
        assert not call.closed
    lines = [r.getMessage() for r in caplog.records if r.name == "callbrain.server.handshake"]
    assert len(lines) == 3
    assert all("from 127.0.0.1: no complete handshake within 0.5 s" in line for line in lines)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade("/llm-websocket/" + "x" * 9000), b"414"),
        (upgrade(extra="".join(f"X-Filler-{n}: 1\r\n" for n in range(200))), b"431"),
        (upgrade(extra="Content-Length: 5\r\n") + b"hello", b"400"),  # no body on an upgrade
        (upgrade(extra="X-Big: " + "b" * 70_000 + "\r\n"), b"431"),  # a line over 8 KB
        (b"GET /healthz HTTP/1.1\r\nX-Endless: " + b"b" * 70_000, b"431"),  # never ends
    ],
    ids=["9 KB URL", "200 headers", "upgrade with a body", "70 KB header", "endless head"],
)
async def test_a_malformed_handshake_gets_an_http_error_at_once(
    fake: FakeOpenAIServer, request_bytes: bytes, status: bytes
) -> None:
    async with serve_agent(make_agent(fake, handshake_timeout_s=LONG)) as url:
        answer = await read_until_closed(await open_raw(url, request_bytes))
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:80]
        # The server is no worse for it.
        async with RetellClient.connect(url, "c1") as call:
            await call.expect_config()


async def test_past_max_pending_handshakes_the_oldest_is_closed(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(fake, handshake_timeout_s=LONG, max_pending_handshakes=4)
    async with serve_agent(agent) as url:
        idle = [await open_raw(url) for _ in range(10)]
        # Each new connection closes the oldest half-open one: six are gone, long
        # before their deadline.
        assert await asyncio.gather(*map(read_until_closed, idle[:6])) == [b""] * 6
        async with RetellClient.connect(url, "c1") as call:  # and a call gets through
            await call.expect_config()
        for _, writer in idle:
            writer.close()
    assert "more than 4 connections were waiting on a handshake" in caplog.text


# -------------------------------------------------- a flood, at a low file limit


def healthz(port: int) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return int(reply.status)
    except (urllib.error.URLError, OSError) as exc:
        return type(exc).__name__


@contextlib.asynccontextmanager
async def serve_process(
    agent_yaml: str, *, nofile: tuple[int, int]
) -> AsyncIterator[tuple[int, Path]]:
    """``callbrain serve`` with ``RLIMIT_NOFILE`` set to ``nofile`` (soft, hard);
    yields its port and its log file."""
    folder = Path(tempfile.mkdtemp())
    agent_file, log = folder / "agent.yaml", folder / "server.log"
    agent_file.write_text(agent_yaml)
    port = free_port()

    def lower_the_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    with log.open("wb") as output:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "callbrain", "serve", "--agent", str(agent_file),
            "--port", str(port),
            preexec_fn=lower_the_limit,
            stdout=output,
            stderr=output,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while await asyncio.to_thread(healthz, port) != 200:
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.1)
        yield port, log
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            raise


async def test_a_flood_of_half_open_connections_does_not_stop_calls_or_health(
    fake: FakeOpenAIServer,
) -> None:
    agent_yaml = (
        "name: flooded\nbegin_message: Hi.\n"
        f"llm: {{provider: openai, base_url: '{fake.base_url}', api_key: sk-test}}\n"
        "server:\n  access:\n    handshake_timeout_s: 1\n"
    )
    flood: list[Stream] = []
    # 300 sockets against 256 descriptors: without a bound the server cannot accept.
    async with serve_process(agent_yaml, nofile=(128, 256)) as (port, log):
        url = f"ws://127.0.0.1:{port}/llm-websocket"
        try:
            for n in range(300):
                flood.append(await open_raw(url, upgrade()[:30] if n % 2 else b""))
            async with RetellClient.connect(url, "real-call") as call:
                await call.expect_config()
                await call.expect_begin()
                assert (await call.ask("Hello?")).text == "Still here."
            assert await asyncio.to_thread(healthz, port) == 200
            # And none of the flood is kept.
            assert await asyncio.gather(*map(read_until_closed, flood)) == [b""] * len(flood)
        finally:
            for _, writer in flood:
                writer.close()
    text = log.read_text()
    assert "open-file limit: 256 (raised from 128); at most 64 connections" in text, text


def test_the_open_file_limit_is_raised_to_the_hard_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="callbrain.server")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 4096) // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_open_file_limit(1000) == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    [line] = [r.getMessage() for r in caplog.records if "open-file limit" in r.getMessage()]
    assert line.startswith(f"open-file limit: {hard} (raised from {lowered})")
