"""Access control and limits on the call socket, over real sockets.

Every server here runs with ``proxy_headers=False``, as ``callbrain serve`` does:
uvicorn's default would itself believe 127.0.0.1's X-Forwarded-For and rewrite
the client address before the guard sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from support import agent_on
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent, AgentConfigError
from callbrain.call.conversation import fit_transcript
from callbrain.retell.frames import ResponseRequired, parse_inbound
from callbrain.server.access import AccessGuard, RejectionLimiter, parse_address
from callbrain.server.app import create_app
from callbrain.server.settings import AccessSettings, ServerSettings
from callbrain.testing.client import RetellClient, agent, user
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.serve import free_port, serve_asgi

SECRET = "s3cret-Qx7vLm2pR9tZk4Wd"
WRONG = SECRET[:-4] + "AAAA"  # shares all but its last characters with the secret
ACCESS_LOG = "callbrain.server.access"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


def make_agent(fake: FakeOpenAIServer, **access: Any) -> Agent:
    server = ServerSettings(access=AccessSettings.model_validate(access))
    return agent_on(fake, name="acl", begin_message="Hi.", server=server)


@contextlib.asynccontextmanager
async def serving(
    fake: FakeOpenAIServer, uvicorn_options: dict[str, Any] | None = None, **access: Any
) -> AsyncIterator[tuple[str, Starlette]]:
    """The agent's app on loopback; yields its WebSocket base URL and the app."""
    app = create_app(make_agent(fake, **access))
    async with serve_asgi(app, proxy_headers=False, **(uvicorn_options or {})) as http:
        yield "ws" + http.removeprefix("http") + "/llm-websocket", app


async def first_frame(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Connect to the full ``url`` and return the first frame (config when admitted)."""
    async with connect(url, open_timeout=5, additional_headers=headers) as ws:
        frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        return frame


async def admitted(url: str, headers: dict[str, str] | None = None) -> bool:
    return (await first_frame(url, headers))["response_type"] == "config"


async def refused(url: str, headers: dict[str, str] | None = None) -> bool:
    """The handshake got a 403 with an empty body: no socket, so never a frame."""
    with pytest.raises(InvalidStatus) as info:
        await first_frame(url, headers)
    return info.value.response.status_code == 403 and not info.value.response.body


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS_LOG]


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    # Polled: the server's count drops when its side of the socket has wound down.
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


# -------------------------------------------------------------------- secret


async def test_without_settings_the_socket_is_open_as_before(fake: FakeOpenAIServer) -> None:
    async with serving(fake) as (base, _):
        assert await admitted(f"{base}/c1")
        # No secret configured: no secret route either (nothing is served there).
        with pytest.raises(InvalidStatus) as info:
            await first_frame(f"{base}/anything/c1")
        assert info.value.response.status_code == 404


async def test_the_secret_as_a_path_segment_is_admitted(fake: FakeOpenAIServer) -> None:
    fake.script(Reply("Secretly yours."))
    async with (
        serving(fake, secret=SECRET) as (base, _),
        RetellClient.connect(f"{base}/{SECRET}", "c1") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
        assert (await call.ask("Hello?")).text == "Secretly yours."


async def test_the_secret_as_a_token_query_parameter_is_admitted(fake: FakeOpenAIServer) -> None:
    async with serving(fake, secret=SECRET) as (base, _):
        assert await admitted(f"{base}/c1?token={SECRET}")


async def test_a_wrong_or_missing_secret_gets_the_same_403_and_is_logged_without_it(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    attempts = [
        "/c1",  # the plain route, no secret at all
        f"/{WRONG}/c1",
        f"/c1?token={WRONG}",
        f"/c1?token={WRONG}&other=1",
        f"/{SECRET}",  # the secret, but in the call id's place: no secret segment
    ]
    async with serving(fake, secret=SECRET) as (base, app):
        for attempt in attempts:
            assert await refused(base + attempt), attempt
        assert app.state.runtime.active_calls == 0
    lines = refusal_lines(caplog)
    assert len(lines) == len(attempts)
    assert sum("no secret given" in line for line in lines) == 2
    assert sum("wrong secret" in line for line in lines) == 3
    assert all("from 127.0.0.1 to /llm-websocket/" in line for line in lines)
    assert "/llm-websocket/<redacted>/c1" in lines[1]
    assert "token=<redacted>&other=1" in lines[3]
    # Neither the secret nor the wrong one, nor even their common prefix.
    assert SECRET[:-4] not in caplog.text


async def test_uvicorn_lines_show_the_path_redacted(fake: FakeOpenAIServer) -> None:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    async with serving(fake, {"log_level": "info"}, secret=SECRET) as (base, _):
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(handler)
        try:
            assert await admitted(f"{base}/{SECRET}/c1")
            assert await admitted(f"{base}/c2?token={SECRET}")
            assert await refused(f"{base}/{WRONG}/c3")
        finally:
            uvicorn_log.removeHandler(handler)
    handshakes = [line for line in seen if '"WebSocket ' in line]
    assert len(handshakes) == 3, seen
    assert '/llm-websocket/<redacted>/c1" [accepted]' in handshakes[0]
    assert '/llm-websocket/c2?token=<redacted>" [accepted]' in handshakes[1]
    assert '/llm-websocket/<redacted>/c3" 403' in handshakes[2]
    assert not any(SECRET[:-4] in line for line in seen)


def test_the_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    guard = AccessGuard(AccessSettings.model_validate({"secret": SECRET}))
    assert guard.secret_matches(SECRET)
    assert not guard.secret_matches(WRONG)
    assert not guard.secret_matches(None)
    assert compared == [(SECRET.encode(), SECRET.encode()), (WRONG.encode(), SECRET.encode())]
    assert AccessGuard(AccessSettings()).secret_matches(None)


@pytest.mark.parametrize("block", ["access", "webhooks"])
def test_an_empty_secret_is_a_configuration_error(block: str) -> None:
    key = "secret" if block == "access" else "api_key"
    with pytest.raises(AgentConfigError, match=rf"server\.{block}\.{key}: is empty"):
        Agent.from_dict({"server": {block: {key: " "}}}, source="agent.yaml")


# ----------------------------------------------------------------- addresses


def test_addresses_are_read_as_peers_and_proxies_write_them() -> None:
    assert str(parse_address("100.20.5.228:443")) == "100.20.5.228"
    assert str(parse_address("::ffff:100.20.5.228")) == "100.20.5.228"  # dual-stack listener
    assert str(parse_address("[2001:db8::1]:443")) == "2001:db8::1"
    assert parse_address("unknown") is None
    guard = AccessGuard(AccessSettings.model_validate({"trusted_proxies": ["10.0.0.0/8"]}))
    chain = ["198.51.100.1, 203.0.113.7", "10.0.0.2"]  # two headers: joined in order
    assert str(guard.client_address("10.0.0.1", chain)) == "203.0.113.7"
    assert str(guard.client_address("192.0.2.1", chain)) == "192.0.2.1"  # not a proxy
    assert str(guard.client_address("10.0.0.1", [])) == "10.0.0.1"
    assert str(guard.client_address("10.0.0.1", ["10.0.0.9"])) == "10.0.0.9"
    assert guard.client_address("10.0.0.1", ["1.2.3.4, bogus"]) is None


async def test_forwarded_for_is_honoured_from_a_trusted_proxy(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    access = {"allow_ips": ["203.0.113.7/32"], "trusted_proxies": ["127.0.0.1/32"]}
    async with serving(fake, **access) as (base, _):
        assert await admitted(f"{base}/c1", {"X-Forwarded-For": "203.0.113.7"})
        # The proxy appends the real client: an allowed address to its left is a forgery.
        assert await refused(f"{base}/c2", {"X-Forwarded-For": "203.0.113.7, 198.51.100.1"})
        assert await refused(f"{base}/c3")  # the proxy itself is not allowed
    lines = refusal_lines(caplog)
    assert "from 198.51.100.1 (via 127.0.0.1)" in lines[0]
    assert "address not in allow_ips" in lines[0]
    assert "from 127.0.0.1 to" in lines[1]


async def test_forwarded_for_is_ignored_from_an_untrusted_peer(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(fake, allow_ips=["203.0.113.7/32"]) as (base, _):
        assert await refused(f"{base}/c1", {"X-Forwarded-For": "203.0.113.7"})
    assert "from 127.0.0.1 to /llm-websocket/c1: address not in allow_ips" in caplog.text
    async with serving(fake, allow_ips=["127.0.0.0/8"]) as (base, _):
        assert await admitted(f"{base}/c1", {"X-Forwarded-For": "198.51.100.1"})


# --------------------------------------------------------------- rate limit


async def test_refusals_are_logged_up_to_the_rate_limit(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(fake, secret=SECRET, rejections_per_minute=3) as (base, _):
        for n in range(7):
            assert await refused(f"{base}/{WRONG}/c{n}")
    lines = refusal_lines(caplog)
    assert len(lines) == 4
    assert all("wrong secret" in line for line in lines[:3])
    assert "127.0.0.1" in lines[3] and "not logged" in lines[3]


def test_the_limiter_windows_per_address_and_stays_bounded() -> None:
    now = [0.0]
    limiter = RejectionLimiter(2, max_addresses=100, clock=lambda: now[0])
    assert [limiter.hit("a") for _ in range(4)] == ["log", "log", "suppress", "quiet"]
    assert limiter.hit("b") == "log"  # per address
    now[0] = 60.0
    assert limiter.hit("a") == "log"  # a new minute
    for n in range(10_000):
        limiter.hit(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 100
    now[0] = 200.0
    limiter.hit("c")  # windows that are over are dropped as they come up
    assert len(limiter) == 1


# ---------------------------------------------------------------- max_calls


async def test_max_calls_refuses_the_next_call_until_one_hangs_up(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(fake, max_calls=2) as (base, app):
        runtime = app.state.runtime
        async with RetellClient.connect(base, "c1") as first:
            await first.expect_config()
            async with RetellClient.connect(base, "c2") as second:
                await second.expect_config()
                assert await refused(f"{base}/c3")
                assert (await second.ask("Still there?")).complete  # the others go on
            await eventually(lambda: runtime.active_calls == 1)
            assert await admitted(f"{base}/c3")
    assert "too many calls (2 in progress, max_calls is 2)" in caplog.text


# ------------------------------------------------------------------- limits


async def test_an_oversized_update_is_ignored_but_an_oversized_request_is_answered(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(Reply("Still here."), Reply("Answered anyway."))
    async with (
        serving(fake, max_frame_bytes=1024) as (base, _),
        RetellClient.connect(base, "c1") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
        for text in ("x" * 1100, "é" * 600):  # 600 characters, but 1200 bytes
            await call.send({"interaction_type": "update_only", "transcript": [user(text)]})
        await call.ping()
        assert (await call.ask("Hello?")).text == "Still here."
        # A request for an answer is never dropped, whatever its size: dead air is worse.
        big = await call.ask("y" * 2000)
        assert big.text == "Answered anyway." and big.completes == 1
        assert not call.closed
    assert len(fake.requests) == 2
    sizes = [r.getMessage() for r in caplog.records if "over max_frame_bytes (1024)" in r.message]
    # The two updates above and the one ask() sends before its big request.
    assert len(sizes) == 3 and "ignored a 1" in sizes[0]


async def test_an_oversized_transcript_reaches_the_model_newest_first(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        serving(fake, max_transcript_chars=1000) as (base, _),
        RetellClient.connect(base, "c1") as call,
    ):
        await call.expect_config()
        await call.expect_begin()
        call.transcript = [
            user("a" * 300),
            agent("b" * 300),
            user("c" * 300),
            agent("d" * 300),
            user("e" * 300),
        ]
        assert (await call.response(await call.request())).complete
    contents = orjson.dumps(fake.requests[-1].body["messages"]).decode()
    assert "c" * 300 in contents and "d" * 300 in contents and "e" * 300 in contents
    assert "a" * 300 not in contents and "b" * 300 not in contents
    assert "over max_transcript_chars (1000)" in caplog.text
    assert "the oldest 2 utterance(s) left out" in caplog.text


def test_a_cut_transcript_keeps_its_positions_and_the_newest_words() -> None:
    raw = {
        "interaction_type": "response_required",
        "response_id": 1,
        "transcript": [user("a" * 600), agent("b" * 600), user("c" * 1500)],
        "transcript_with_tool_calls": [
            user("a" * 600),
            {"role": "tool_call_invocation", "tool_call_id": "t", "name": "f", "arguments": "{}"},
            {"role": "tool_call_result", "tool_call_id": "t", "content": "r" * 300},
            agent("b" * 600),
        ],
    }
    frame = parse_inbound(orjson.dumps(raw))
    assert isinstance(frame, ResponseRequired)
    fitted, cut = fit_transcript(frame, 1000)
    # Same length, so the tool history's anchors (positions) still line up.
    assert [u.content for u in fitted.transcript] == ["", "", "c" * 1000]
    assert fitted.transcript_with_tool_calls is not None
    assert [i["role"] for i in fitted.transcript_with_tool_calls] == [
        "tool_call_invocation",
        "tool_call_result",
        "agent",
    ]
    assert cut is not None and "the oldest 2 utterance(s)" in cut and "the oldest 1 left" in cut
    assert fit_transcript(frame, 10_000) == (frame, None)


# ---------------------------------------------------------------------- CLI


async def test_serve_hides_the_secret_and_trusts_no_forwarded_for_by_itself(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(
        "name: guarded\nbegin_message: Hi.\n"
        f"llm: {{provider: openai, base_url: '{fake.base_url}', api_key: sk-test}}\n"
        "server:\n  access:\n    secret: ${CB_TEST_SECRET}\n    allow_ips: [127.0.0.1/32]\n"
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        "serve",
        "--agent",
        str(agent_file),
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CB_TEST_SECRET": SECRET, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    try:
        await eventually_healthy(port, proc)
        base = f"ws://127.0.0.1:{port}/llm-websocket"
        # uvicorn's own proxy handling would take this as the client and refuse it.
        assert await admitted(f"{base}/{SECRET}/c1", {"X-Forwarded-For": "198.51.100.1"})
        assert await refused(f"{base}/{WRONG}/c2")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            output = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
        except TimeoutError:
            proc.kill()
            raise
    assert "wss://<your-public-host>/llm-websocket/<secret>" in output
    assert '"WebSocket /llm-websocket/<redacted>/c1" [accepted]' in output
    assert "refused a call socket from 127.0.0.1 to /llm-websocket/<redacted>/c2" in output
    assert SECRET[:-4] not in output


async def eventually_healthy(port: int, proc: asyncio.subprocess.Process) -> None:
    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):  # refused (or timed out) until it is up
            return False

    async with asyncio.timeout(60):
        while not await asyncio.to_thread(up):
            if proc.returncode is not None:
                raise RuntimeError("callbrain serve exited before it was up")
            await asyncio.sleep(0.1)
