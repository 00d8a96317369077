"""``POST /webhook`` against strangers: slow bodies, many at once, refusals that
flood the log, and sync handlers that hang, over real HTTP to a real server.

Each wait has a generous bound and nothing measures how fast: a test fails when
the server holds on to what it should have let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from retell.lib.webhook_auth import symmetric
from starlette.applications import Starlette

from callbrain import create_app
from callbrain.agent import Agent
from callbrain.server.webhooks import WebhookEvent, WebhookHandler
from callbrain.testing import FakeOpenAIServer, FakeToolCall, Reply, RetellClient
from callbrain.testing.serve import serve_asgi
from callbrain.tools import tool

KEY = "key_webhook_4f1c9a7e2b6d8053"
BOUND = 20.0
"""How long a test waits for what should come at once: generous, never a measure."""
BODY = json.dumps({"event": "call_ended", "call": {"call_id": "call_1"}}).encode()
WEBHOOKS_LOG = "callbrain.server.webhooks"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def sign(body: bytes) -> str:
    signature: str = symmetric["sign"](body.decode(), KEY)
    return signature


def agent_with(access: dict[str, Any] | None = None, **webhooks: Any) -> Agent:
    server = {"webhooks": {"api_key": KEY, **webhooks}, "access": access or {}}
    return Agent.from_dict({"name": "hooks", "server": server})


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[tuple[str, int]]:
    """The app (webhooks only: no model is loaded); yields its base URL and port."""
    async with serve_asgi(app, lifespan="off") as base:
        yield base, int(base.rsplit(":", 1)[1])


async def raw_post(port: int, headers: dict[str, str], body: bytes = b"") -> Stream:
    """A POST whose head (and only the ``body`` given) is sent; the rest is up to the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"POST /webhook HTTP/1.1\r\nHost: test\r\n{head}\r\n".encode() + body)
    await writer.drain()
    return reader, writer


async def answer_then_end(stream: Stream) -> bytes:
    """All the server sends until it closes the connection."""
    return await asyncio.wait_for(stream[0].read(), BOUND)


async def test_a_bad_signature_header_is_refused_before_the_body_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stale = "v=1000,d=" + "0" * 64
    async with serving(create_app(agent_with())) as (_, port):
        for headers in ({}, {"X-Retell-Signature": stale}, {"X-Retell-Signature": "v=1"}):
            # Five megabytes announced, none sent: the answer must not wait for them.
            stream = await raw_post(port, {**headers, "Content-Length": "5000000"})
            status = await asyncio.wait_for(stream[0].readline(), BOUND)
            assert status.startswith(b"HTTP/1.1 401 "), status
            stream[1].close()
    assert "no X-Retell-Signature header" in caplog.text
    assert "s old (window 300 s)" in caplog.text
    assert "malformed X-Retell-Signature header" in caplog.text


async def test_a_slow_body_gets_408_and_the_connection_is_closed() -> None:
    agent = agent_with(body_timeout_s=0.3)
    async with serving(create_app(agent)) as (_, port):
        headers = {"X-Retell-Signature": sign(BODY), "Content-Length": str(len(BODY))}
        stream = await raw_post(port, headers, BODY[:5])

        async def one_byte_at_a_time() -> None:  # the client's slowness, not a wait
            for byte in BODY[5:-1]:
                stream[1].write(bytes([byte]))
                await asyncio.sleep(0.05)

        dripping = asyncio.create_task(one_byte_at_a_time())
        try:
            head = await asyncio.wait_for(stream[0].readuntil(b"\r\n\r\n"), BOUND)
            assert head.startswith(b"HTTP/1.1 408 "), head
            assert b"connection: close" in head.lower()
            # Closed: an end of stream, or a reset if it lands on a byte still dripping.
            with contextlib.suppress(ConnectionResetError):
                assert await answer_then_end(stream) == b"body too slow"
        finally:
            dripping.cancel()


async def test_past_max_in_flight_webhooks_get_503_at_once() -> None:
    entered = asyncio.Semaphore(0)
    release = asyncio.Event()

    async def handler(event: WebhookEvent) -> None:
        entered.release()
        await release.wait()

    app = create_app(agent_with(max_in_flight=2), on_webhook=handler)
    async with (
        serving(app) as (base, _),
        httpx2.AsyncClient(base_url=base, trust_env=False, timeout=BOUND) as client,
    ):

        async def post() -> httpx2.Response:
            signature = sign(BODY)
            return await client.post(
                "/webhook", content=BODY, headers={"X-Retell-Signature": signature}
            )

        held = [asyncio.create_task(post()) for _ in range(2)]
        for _ in held:
            await asyncio.wait_for(entered.acquire(), BOUND)
        refused = await post()  # while both handlers are still held
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [204, 204]
        assert (await post()).status_code == 204  # the slots are free again


async def test_refused_webhooks_are_rate_limited_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(agent_with(access={"rejections_per_minute": 3}))
    async with (
        serving(app) as (base, _),
        httpx2.AsyncClient(base_url=base, trust_env=False, timeout=BOUND) as client,
    ):
        for _ in range(7):
            assert (await client.post("/webhook", content=BODY)).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == WEBHOOKS_LOG]
    assert len(lines) == 4
    assert all(
        line == "webhook from 127.0.0.1 refused: no X-Retell-Signature header" for line in lines[:3]
    )
    assert "refused 4 webhooks (127.0.0.1) this minute" in lines[3] and "not logged" in lines[3]


def long_call_analyzed(minutes: int, tool_calls: int) -> bytes:
    """A ``call_analyzed`` event as Retell sends it for a long call: every word with
    its timings in ``transcript_object``, ``transcript_with_tool_calls`` and its
    scrubbed copy, tool results of 2 KB, per-turn latencies."""
    rng = random.Random(7)
    vocabulary = ["yes", "I", "would", "like", "to", "book", "an", "appointment", "on", "Tuesday"]
    utterances, clock = [], 0.0
    for n in range(minutes * 150 // 15):  # 150 words a minute, 15 to a turn
        words = []
        for _ in range(15):
            words.append({"word": rng.choice(vocabulary), "start": clock, "end": clock + 0.3})
            clock = round(clock + 0.4, 3)
        content = " ".join(w["word"] for w in words)
        utterances.append(
            {"role": "agent" if n % 2 else "user", "content": content, "words": words}
        )
    with_tools: list[dict[str, Any]] = list(utterances)
    for n in range(tool_calls):
        at = n * len(utterances) // tool_calls + 2 * n
        invocation = {"role": "tool_call_invocation", "name": "look_up", "arguments": '{"q": 1}'}
        result = {"role": "tool_call_result", "content": "r" * 2000}
        with_tools[at:at] = [
            {**invocation, "tool_call_id": f"t{n}"},
            {**result, "tool_call_id": f"t{n}"},
        ]
    turns = len(utterances) // 2
    latency = {"p50": 800.0, "values": [rng.uniform(500, 2000) for _ in range(turns)]}
    call = {
        "call_id": "call_long",
        "call_status": "ended",
        "transcript": "\n".join(f"{u['role']}: {u['content']}" for u in utterances),
        "transcript_object": utterances,
        "transcript_with_tool_calls": with_tools,
        "scrubbed_transcript_with_tool_calls": with_tools,
        "latency": {kind: latency for kind in ("e2e", "asr", "llm", "tts")},
        "call_analysis": {"call_summary": "s" * 2000},
    }
    return json.dumps({"event": "call_analyzed", "call": call}).encode()


async def test_the_longest_calls_analysis_fits_the_default_body_limit() -> None:
    got: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        got.append(event)

    body = long_call_analyzed(minutes=120, tool_calls=100)  # Retell's longest call
    assert len(body) > 3_000_000
    async with (
        serving(create_app(agent_with(), on_webhook=handler)) as (base, _),
        httpx2.AsyncClient(base_url=base, trust_env=False, timeout=BOUND) as client,
    ):
        response = await client.post(
            "/webhook", content=body, headers={"X-Retell-Signature": sign(body)}
        )
    assert response.status_code == 204
    assert [e.call_id for e in got] == ["call_long"]


# -------------------------------------------------- handlers that hang (item 13)


async def test_hanging_sync_handlers_do_not_stop_a_sync_tool_on_a_live_call() -> None:
    loop = asyncio.get_running_loop()
    release = threading.Event()
    lock = threading.Lock()
    entered: list[int] = []
    handlers_hung, all_refused = asyncio.Event(), asyncio.Event()
    threads = 4
    # More than asyncio's default executor has threads, on any machine (at most 32).
    posts = 40

    def hangs(event: WebhookEvent) -> None:
        with lock:
            entered.append(1)
            if len(entered) == threads:
                loop.call_soon_threadsafe(handlers_hung.set)
        release.wait(60)

    @tool
    def opening_hours(day: str) -> str:
        """When the clinic is open.

        Args:
            day: The day, e.g. "friday".
        """
        return f"{day}: nine to five"

    async with FakeOpenAIServer() as fake:
        fake.script(
            Reply("", tool_calls=[FakeToolCall("opening_hours", {"day": "friday"})]),
            Reply("Nine to five."),
        )
        agent = Agent.from_dict(
            {
                "name": "hooks",
                "begin_message": "Hi.",
                "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "sk-test"},
                "server": {
                    "webhooks": {
                        "api_key": KEY,
                        "handler_threads": threads,
                        "handler_timeout_s": 60,
                        "max_in_flight": 64,
                    }
                },
            }
        )
        agent.tools.append(opening_hours)
        handler: WebhookHandler = hangs
        app = create_app(agent, on_webhook=handler)
        statuses: list[int] = []
        async with (
            serve_asgi(app, settings=agent.server) as base,
            httpx2.AsyncClient(base_url=base, trust_env=False, timeout=90) as client,
        ):

            async def post() -> None:
                signature = sign(BODY)
                response = await client.post(
                    "/webhook", content=BODY, headers={"X-Retell-Signature": signature}
                )
                statuses.append(response.status_code)
                if statuses.count(503) == posts - threads:
                    all_refused.set()

            sent = [asyncio.create_task(post()) for _ in range(posts)]
            try:
                await asyncio.wait_for(handlers_hung.wait(), BOUND)
                # With the handlers hung, a call's sync tool still gets a thread...
                url = "ws" + base.removeprefix("http") + "/llm-websocket"
                async with RetellClient.connect(url, "call-1") as call:
                    await call.expect_config()
                    await call.expect_begin()
                    turn = await call.ask("When are you open on Friday?")
                    [result] = [
                        f for f in call.frames if f.get("response_type") == "tool_call_result"
                    ]
                assert result["successful"] is True and result["content"] == "friday: nine to five"
                assert turn.text.endswith("Nine to five.")
                # ...and the other events are answered at once, not queued behind them.
                await asyncio.wait_for(all_refused.wait(), BOUND)
            finally:
                release.set()
                await asyncio.gather(*sent, return_exceptions=True)
    assert sorted(statuses) == [204] * threads + [503] * (posts - threads)


@pytest.fixture(autouse=True)
def _webhook_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=WEBHOOKS_LOG)
