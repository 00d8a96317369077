"""Graceful shutdown: calls in progress finish their turns, new ones go elsewhere.

In-process against the app's runtime, and once as a user runs it: ``callbrain
serve`` in its own process, sent SIGTERM in the middle of a reply.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import agent_on
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent
from callbrain.server.app import create_app
from callbrain.testing import FakeOpenAIServer, Reply, RetellClient, serve_asgi
from callbrain.testing.serve import free_port

WORDS = ["We ", "are ", "open ", "from ", "nine ", "to ", "five ", "on ", "weekdays."]


def make_agent(fake: FakeOpenAIServer) -> Agent:
    return agent_on(fake, name="drain")


def health(http_url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(http_url + "/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def is_chunk_prefix(text: str) -> bool:
    """The text is whole chunks of the reply: nothing was cut inside one."""
    return any(text == "".join(WORDS[:n]) for n in range(len(WORDS) + 1))


async def test_a_drain_finishes_the_open_turn_between_chunks_and_refuses_new_calls() -> None:
    # The reply stalls after three chunks: only the drain can end this turn.
    async with FakeOpenAIServer(Reply(WORDS, stall_after=3)) as fake:
        app = create_app(make_agent(fake))
        runtime = app.state.runtime
        async with serve_asgi(app) as http:
            url = "ws" + http.removeprefix("http") + "/llm-websocket"
            async with RetellClient.connect(url, "in-progress") as call:
                await call.expect_config()
                await call.expect_begin()
                rid = await call.say("When are you open?")
                await call.wait_for(lambda _: len(call.checker.turns[rid].text) > 0)
                drain = asyncio.create_task(runtime.drain(0.3, grace=0.3))
                await asyncio.sleep(0)  # one loop turn: the drain task starts and marks itself
                status, body = await asyncio.to_thread(health, http)
                assert status == 503 and '"draining"' in body
                with pytest.raises(InvalidStatus):
                    async with RetellClient.connect(url, "too-late"):
                        pass
                assert await drain == 1  # one call was still up when time ran out
                turn = await call.response(rid, timeout=5)
                assert turn.completes == 1 and turn.frames[-1]["content"] == ""
                assert is_chunk_prefix(turn.text) and turn.text.startswith("We are")
                await call.ping()  # the call itself is still served until it is dropped
                assert call.checker.finish(asyncio.get_running_loop().time()) == []


async def test_calls_that_end_during_the_drain_let_it_finish_early() -> None:
    async with FakeOpenAIServer(Reply("Bye now.")) as fake:
        app = create_app(make_agent(fake))
        async with serve_asgi(app) as http:
            url = "ws" + http.removeprefix("http") + "/llm-websocket"
            async with RetellClient.connect(url, "short") as call:
                await call.expect_config()
                await call.expect_begin()
                drain = asyncio.create_task(app.state.runtime.drain(60))
                reply = await call.ask("Thanks, bye")
                assert reply.text == "Bye now." and reply.completes == 1
            assert await asyncio.wait_for(drain, 10) == 0


async def test_sigterm_drains_callbrain_serve_and_exits_cleanly(tmp_path: Path) -> None:
    async with FakeOpenAIServer(Reply(WORDS, stall_after=2)) as fake:
        agent = {
            "name": "drain",
            "begin_message": "Hello.",
            "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
            "server": {"drain_s": 1.0, "finish_turn_s": 0.3},
        }
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(agent), encoding="utf-8")
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "callbrain", "serve", "--agent", str(path),
            "--port", str(port), "--log-level", "info",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        seen: list[bytes] = []

        async def log_line(marker: bytes) -> None:
            """Read the server's log until a line with ``marker`` (events, not sleeps)."""
            assert proc.stdout is not None
            while marker not in (line := await proc.stdout.readline()):
                assert line, b"".join(seen).decode() + "\nthe server exited"
                seen.append(line)
            seen.append(line)

        try:
            http = f"http://127.0.0.1:{port}"
            await asyncio.wait_for(log_line(b"listening on http://"), 60)
            async with RetellClient.connect(f"ws://127.0.0.1:{port}/llm-websocket", "c1") as call:
                await call.expect_config()
                await call.expect_begin()
                rid = await call.say("When are you open?")
                await call.wait_for(lambda _: len(call.checker.turns[rid].text) > 0)
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(log_line(b"draining: 1 call(s) in progress"), 10)
                status, _ = await asyncio.to_thread(health, http)
                assert status == 503
                turn = await call.response(rid, timeout=10)
                assert turn.completes == 1 and is_chunk_prefix(turn.text)
                # Then the connection is dropped without a close frame (1006), which
                # Retell answers by reconnecting; a close code would end the call.
                await call.wait_for(lambda _: call.closed, timeout=10)
                assert call.close_code == 1006
            rest, _ = await asyncio.wait_for(proc.communicate(), 20)
            output = b"".join(seen) + rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text
    assert "shutting down gracefully" in text
    assert "dropped 1 call socket(s)" in text
