"""``callbrain serve --workers 2`` as a user runs it: a supervisor and two
worker processes on one port, with a real fake model, real sockets and signals.

Which worker takes a connection is the kernel's choice; the tests make it
theirs by freezing the other worker (SIGSTOP): a stopped process cannot accept,
so the one still running does. That is how a reconnect is sent to the worker
that did not serve the call's first socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from callbrain.testing import FakeOpenAIServer, Reply, RetellClient
from callbrain.testing.serve import free_port

WORDS = ["We ", "are ", "open ", "from ", "nine ", "to ", "five."]


class Served:
    """A ``callbrain serve --workers 2`` process and what its log has said."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/llm-websocket"
        self.seen: list[str] = []
        self.pids: dict[int, int] = {}
        """Worker number to pid, from the supervisor's "worker N started" lines."""

    async def line(self, marker: str, timeout: float = 60) -> str:
        """Read the log until a line with ``marker`` (events, not sleeps)."""

        async def read() -> str:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, "\n".join(self.seen) + "\nthe server exited"
                text = raw.decode(errors="replace").rstrip()
                self.seen.append(text)
                if started := re.search(r"worker (\d+) started \(pid (\d+)\)", text):
                    self.pids[int(started[1])] = int(started[2])
                if marker in text:
                    return text

        return await asyncio.wait_for(read(), timeout)

    @contextlib.contextmanager
    def only(self, number: int) -> Any:
        """Every other worker stopped (SIGSTOP) inside the block: ``number`` takes
        the new connections."""
        others = [pid for n, pid in self.pids.items() if n != number]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, fake: FakeOpenAIServer, **server: Any) -> AsyncIterator[Served]:
    agent = {
        "name": "workers",
        "begin_message": "Hi, Sunrise Clinic.",
        "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
        "server": {"drain_s": 1.0, "finish_turn_s": 0.3, **server},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(agent), encoding="utf-8")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "serve", str(path), "--port", str(port),
        "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")},
    )  # fmt: skip
    served = Served(proc, port)
    try:
        await served.line("Workers ")  # the banner, then both workers listen
        await served.line("listening on http://")
        assert sorted(served.pids) == [1, 2]
        yield served
    finally:
        if proc.returncode is None:
            for pid in served.pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            proc.kill()  # the workers see their link close and stop too
            await proc.wait()


def health(http: str) -> tuple[int, dict[str, Any]]:
    import json

    try:
        with urllib.request.urlopen(http + "/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def scrape(http: str) -> dict[str, float]:
    with urllib.request.urlopen(http + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def scrape_when_idle(http: str) -> dict[str, float]:
    """A scrape once no call is active. A worker counts a call's end just after
    its socket has closed, so a scrape right after the client's close may still
    see it: the gauge is polled until it settles (up to 10 s), not timed."""
    samples = await asyncio.to_thread(scrape, http)
    for _ in range(200):
        if samples["callbrain_calls_active"] == 0:
            break
        await asyncio.sleep(0.05)
        samples = await asyncio.to_thread(scrape, http)
    return samples


async def call_then_reconnect_elsewhere(served: Served) -> None:
    """A call's first socket on worker 1, dropped; its reconnect on worker 2,
    which knows the call (no second greeting) and the conversation so far."""
    with served.only(1):
        assert (await asyncio.to_thread(health, served.http))[1]["pid"] == served.pids[1]
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            assert (await call.expect_begin()).text == "Hi, Sunrise Clinic."
            assert (await call.ask("When are you open?")).text == "Nine to five."
            transcript = list(call.transcript)
            call.reset()  # a TCP reset: Retell reconnects
    with served.only(2):
        assert (await asyncio.to_thread(health, served.http))[1]["pid"] == served.pids[2]
        async with RetellClient.connect(served.ws, "call-1") as call:
            call.transcript = transcript
            await call.expect_config()
            assert (await call.expect_begin()).text == ""  # it knew the call: mid-call
            assert (await call.ask("And Saturdays?")).text == "Closed on Saturdays."
            assert call.checker.finish(asyncio.get_running_loop().time()) == []


async def sigterm_drains_both(served: Served) -> str:
    """An open turn when SIGTERM arrives is finished; every worker drains; the
    supervisor exits 0. Returns the whole log."""
    async with RetellClient.connect(served.ws, "call-2") as call:
        await call.expect_config()
        await call.expect_begin()
        rid = await call.say("When are you open?")
        await call.wait_for(lambda _: len(call.checker.turns[rid].text) > 0)
        served.proc.send_signal(signal.SIGTERM)
        drained = {await served.line("draining: "), await served.line("draining: ")}
        assert {"worker=1" in d for d in drained} == {True, False}  # one line each
        status, body = await asyncio.to_thread(health, served.http)
        assert status == 503 and body["status"] == "draining"
        turn = await call.response(rid, timeout=10)
        assert turn.completes == 1 and "".join(WORDS).startswith(turn.text) and turn.text
        await call.wait_for(lambda _: call.closed, timeout=10)
        assert call.close_code == 1006  # dropped for Retell to reconnect elsewhere
    rest, _ = await asyncio.wait_for(served.proc.communicate(), 20)
    assert served.proc.returncode == 0, "\n".join(served.seen) + rest.decode()
    return "\n".join(served.seen) + "\n" + rest.decode()


def replies() -> list[Reply]:
    return [
        Reply("Nine to five."),
        Reply("Closed on Saturdays."),
        Reply(WORDS, stall_after=2),  # the drain's open turn: only the drain ends it
    ]


async def test_two_workers_share_call_memory_metrics_records_and_drain(tmp_path: Path) -> None:
    async with FakeOpenAIServer(*replies()) as fake, serve(tmp_path, fake) as served:
        assert "store: SQLite " in "\n".join(served.seen)  # no Redis: the shared file
        await call_then_reconnect_elsewhere(served)
        # One scrape, from whichever worker, counts both: the call on worker 1,
        # its reconnect on worker 2.
        samples = await scrape_when_idle(served.http)
        assert samples["callbrain_calls_total"] == 1
        assert samples["callbrain_reconnects_total"] == 1
        assert samples["callbrain_calls_active"] == 0
        log = await sigterm_drains_both(served)
    assert "worker 1 (pid" in log and "worker 2 (pid" in log and "has stopped" in log
    # Each worker recorded its own socket of the call to the one database.
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "callbrain" / "calls.db")) as db:
        sockets = db.execute(
            "SELECT socket_number FROM calls WHERE call_id = 'call-1' ORDER BY socket_number"
        ).fetchall()
    assert sockets == [(1,), (2,)]


async def test_two_workers_share_call_memory_in_redis(tmp_path: Path, redis_url: str) -> None:
    async with (
        FakeOpenAIServer(*replies()) as fake,
        serve(
            tmp_path, fake, store={"redis_url": redis_url, "redis_prefix": "cb-workers:"}
        ) as served,
    ):
        assert "store: Redis" in "\n".join(served.seen)
        await call_then_reconnect_elsewhere(served)
        await sigterm_drains_both(served)


async def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    async with (
        FakeOpenAIServer(default=Reply("Nine to five.")) as fake,
        serve(tmp_path, fake) as served,
    ):
        dead = served.pids[2]
        os.kill(dead, signal.SIGKILL)
        await served.line("exited killed by SIGKILL; starting another")
        await served.line("worker 2 started")
        await served.line("worker 2 (pid")  # "... is taking calls"
        assert served.pids[2] != dead
        with served.only(2):  # the new worker 2 serves calls
            async with RetellClient.connect(served.ws, "call-3") as call:
                await call.expect_config()
                await call.expect_begin()
                assert (await call.ask("Hours?")).text == "Nine to five."
        served.proc.send_signal(signal.SIGINT)  # Ctrl-C: a drain too
        await asyncio.wait_for(served.proc.communicate(), 20)
        assert served.proc.returncode == 0


async def test_a_worker_that_cannot_start_fails_the_start_in_one_line(tmp_path: Path) -> None:
    agent = {
        "name": "nostore",
        "llm": {"provider": "openai", "base_url": "http://127.0.0.1:9", "api_key": "k"},
        "server": {"store": {"redis_url": f"redis://127.0.0.1:{free_port()}/0"}},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(agent), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "serve", str(path), "--port", "0", "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    errors = [line for line in err.decode().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, err.decode()
    assert len(errors) == 1 and "server.store.redis_url does not answer" in errors[0]
    assert "Workers " not in err.decode()  # no banner for a server that is not there


@pytest.mark.parametrize("workers", ["0", "two"])
async def test_a_bad_worker_count_is_one_line(workers: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", "serve", "--workers", workers,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and "--workers" in err.decode()
