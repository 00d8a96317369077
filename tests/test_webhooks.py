"""``POST /webhook``: Retell's signed call events, checked against the official SDK.

Signatures are made by ``retell-sdk``'s own signing code, so these tests hold
callbrain to what Retell's library does, not to a copy of our own reading of it.
Every request is real HTTP to the app on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from retell.lib.webhook_auth import symmetric
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from callbrain import create_app
from callbrain.agent import Agent, AgentConfigError
from callbrain.logs import call_id_var
from callbrain.server.settings import WebhookSettings
from callbrain.server.webhooks import WebhookEvent, webhook_endpoint
from callbrain.signing import verify_retell_webhook
from callbrain.testing.serve import serve_asgi

sdk_sign: Callable[..., str] = symmetric["sign"]
sdk_verify: Callable[..., bool] = symmetric["verify"]

KEY = "key_webhook_4f1c9a7e2b6d8053"
OTHER_KEY = "key_webhook_0000000000000000"
MINUTE_MS = 60_000

# Pretty-printed, with accents: any re-serialisation changes these bytes.
BODY = json.dumps(
    {
        "event": "call_ended",
        "call": {
            "call_id": "call_7f3e",
            "agent_id": "agent_1",
            "call_status": "ended",
            "retell_llm_dynamic_variables": {"first_name": "José"},
            "transcript": "Agent: ¿En qué puedo ayudarle?\nUser: Soy José Núñez.",
        },
    },
    indent=2,
    ensure_ascii=False,
)

received: list[WebhookEvent] = []
"""What :func:`record_event` was given; it is referred to as ``test_webhooks:record_event``."""
seen_call_ids: list[str] = []


def record_event(event: WebhookEvent) -> None:
    """A sync handler, loaded from the agent file by reference."""
    received.append(event)
    seen_call_ids.append(call_id_var.get())


def two_arguments(event: WebhookEvent, extra: int) -> None:
    """Not a handler: it cannot be called with just the event."""


@pytest.fixture(autouse=True)
def _reset() -> None:
    received.clear()
    seen_call_ids.clear()


def now_ms() -> int:
    return int(time.time() * 1000)


def agent_with(**webhooks: Any) -> Agent:
    return Agent.from_dict({"name": "hooks", "server": {"webhooks": webhooks}})


@asynccontextmanager
async def client_for(app: ASGIApp) -> AsyncIterator[httpx2.AsyncClient]:
    # No lifespan: the webhook route needs no model, and none is loaded here.
    async with (
        serve_asgi(app, lifespan="off") as base,
        httpx2.AsyncClient(base_url=base, trust_env=False, timeout=10) as client,
    ):
        yield client


async def post(
    client: httpx2.AsyncClient, body: str | bytes, signature: str | None, path: str = "/webhook"
) -> httpx2.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Retell-Signature"] = signature
    content = body.encode() if isinstance(body, str) else body
    return await client.post(path, content=content, headers=headers)


def assert_no_secrets_logged(caplog: pytest.LogCaptureFixture, *signatures: str) -> None:
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert KEY not in text
    for signature in signatures:
        digest = re.search(r"[0-9a-f]{64}", signature)
        assert digest is not None and digest.group() not in text


# --- Accepted events ---------------------------------------------------------


async def test_an_event_signed_by_the_sdk_reaches_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    got: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        got.append(event)

    signature = sdk_sign(BODY, KEY)
    assert json.dumps(json.loads(BODY)) != BODY  # re-serialising would change the bytes
    async with client_for(create_app(agent_with(api_key=KEY), on_webhook=handler)) as client:
        response = await post(client, BODY, signature)
    assert response.status_code == 204
    assert response.content == b""
    [event] = got
    assert event.event == "call_ended"
    assert event.call_id == "call_7f3e"
    assert event.call["retell_llm_dynamic_variables"] == {"first_name": "José"}
    assert event.raw == json.loads(BODY)
    assert_no_secrets_logged(caplog, signature)


async def test_a_sync_handler_runs_in_a_worker_thread() -> None:
    threads: list[threading.Thread] = []

    def handler(event: WebhookEvent) -> None:
        threads.append(threading.current_thread())

    async with client_for(create_app(agent_with(api_key=KEY), on_webhook=handler)) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY))
    assert response.status_code == 204
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


async def test_unknown_event_types_are_passed_on() -> None:
    got: list[WebhookEvent] = []

    async def handler(event: WebhookEvent) -> None:
        got.append(event)

    body = '{"event": "transcript_updated", "call": {"call_id": "c2"}, "extra": [1, 2]}'
    async with client_for(create_app(agent_with(api_key=KEY), on_webhook=handler)) as client:
        response = await post(client, body, sdk_sign(body, KEY))
    assert response.status_code == 204
    assert [(e.event, e.call_id, e.raw["extra"]) for e in got] == [
        ("transcript_updated", "c2", [1, 2])
    ]


async def test_the_handler_can_come_from_the_agent_file(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent.from_yaml_text(
        f"""
        name: filed
        server:
          webhooks:
            api_key: {KEY}
            path: hooks/retell/
            handler: test_webhooks:record_event
        """
    )
    async with client_for(create_app(agent)) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY), path="/hooks/retell")
    assert response.status_code == 204
    assert [e.call_id for e in received] == ["call_7f3e"]
    assert seen_call_ids == ["call_7f3e"]  # the handler's log lines name the call
    assert_no_secrets_logged(caplog)


async def test_without_a_handler_verified_events_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="callbrain.server.webhooks")
    async with client_for(create_app(agent_with(api_key=KEY))) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY))
    assert response.status_code == 204
    [line] = [r.getMessage() for r in caplog.records if r.name == "callbrain.server.webhooks"]
    assert "call_ended" in line and "call_7f3e" in line


async def test_the_route_works_inside_a_mounted_app() -> None:
    api = FastAPI()
    api.mount("/retell", create_app(agent_with(api_key=KEY, handler="test_webhooks:record_event")))
    async with client_for(api) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY), path="/retell/webhook")
    assert response.status_code == 204
    assert len(received) == 1


# --- The signature, against the SDK's own verify -----------------------------


def samples(now: int) -> list[tuple[str, str, str, bool]]:
    """(body, header, key, valid) covering each way a signature can be wrong."""
    good = sdk_sign(BODY, KEY, timestamp=now)
    digest = good.partition(",d=")[2]
    flipped = ("0" if digest[0] != "0" else "1") + digest[1:]
    last_flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    return [
        (BODY, good, KEY, True),
        (BODY, sdk_sign(BODY, KEY, timestamp=now - 5 * MINUTE_MS), KEY, True),  # at the edge
        (BODY, sdk_sign(BODY, KEY, timestamp=now + 4 * MINUTE_MS), KEY, True),  # clock skew
        (BODY, f"v=00{now},d={digest}", KEY, True),  # the SDK reads v as a number
        (BODY, f"v={now},d={flipped}", KEY, False),  # forged digest
        (BODY, f"v={now},d={last_flipped}", KEY, False),  # every character counts
        (BODY, good, OTHER_KEY, False),  # wrong key
        (BODY + " ", good, KEY, False),  # body changed
        (json.dumps(json.loads(BODY)), good, KEY, False),  # re-serialised
        (BODY, sdk_sign(BODY, KEY, timestamp=now - 6 * MINUTE_MS), KEY, False),  # stale
        (BODY, sdk_sign(BODY, KEY, timestamp=now + 6 * MINUTE_MS), KEY, False),  # future
        (BODY, f"v={now - 1},d={digest}", KEY, False),  # timestamp swapped
        (BODY, good.upper(), KEY, False),  # uppercase hex is not what Retell sends
        (BODY, good + ",", KEY, False),
        (BODY, " " + good, KEY, False),
        (BODY, f"d={digest},v={now}", KEY, False),
        (BODY, f"v={now},d={digest[:-1]}", KEY, False),
        (BODY, f"v=,d={digest}", KEY, False),
        (BODY, "", KEY, False),
        (BODY, "garbage", KEY, False),
    ]


def test_verify_retell_webhook_agrees_with_the_sdk() -> None:
    now = now_ms()
    for body, header, key, valid in samples(now):
        ours = verify_retell_webhook(key, body.encode(), header, now_ms=now)
        theirs = sdk_verify(body, key, header, {"timestamp": now})
        assert ours is theirs is valid, (body[:20], header)


def test_verify_retell_webhook_uses_the_clock_and_the_tolerance() -> None:
    old = sdk_sign(BODY, KEY, timestamp=now_ms() - 2 * MINUTE_MS)
    assert verify_retell_webhook(KEY, BODY.encode(), old)
    assert not verify_retell_webhook(KEY, BODY.encode(), old, tolerance_s=60)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "v=" + "9" * 5000 + ",d=" + "a" * 64,  # int() of this would raise in the SDK
        "v=\u0661\u0662\u0663,d=" + "a" * 64,  # Arabic-Indic digits
        "v=1,d=" + "é" * 64,
        "\x00" * 10_000,
    ],
)
def test_garbage_never_raises(header: str | None) -> None:
    assert verify_retell_webhook(KEY, b"\xff\xfe not utf-8", header) is False


def test_an_empty_key_verifies_nothing() -> None:
    now = now_ms()
    assert not verify_retell_webhook(
        "", BODY.encode(), sdk_sign(BODY, "", timestamp=now), now_ms=now
    )


# --- Refused requests --------------------------------------------------------


REFUSALS = {
    # case: the reason the log line must give
    "forged digest": "does not match",
    "wrong key": "does not match",
    "stale": " s old (window 300 s)",
    "future": " s ahead (window 300 s)",
    "malformed": "malformed X-Retell-Signature",
    "missing": "no X-Retell-Signature",
    "re-serialised": "does not match",
}


def refused_request(case: str, now: int) -> tuple[str, str | None]:
    """Built when the test runs: a timestamp taken at collection could age into or
    out of the window before a long run reaches it."""
    good = sdk_sign(BODY, KEY, timestamp=now)
    digest = good.partition(",d=")[2]
    return {
        "forged digest": (BODY, f"v={now},d={'0' * 64}"),
        "wrong key": (BODY, sdk_sign(BODY, OTHER_KEY, timestamp=now)),
        "stale": (BODY, sdk_sign(BODY, KEY, timestamp=now - 6 * MINUTE_MS)),
        "future": (BODY, sdk_sign(BODY, KEY, timestamp=now + 6 * MINUTE_MS)),
        "malformed": (BODY, f"v={now};d={digest}"),
        "missing": (BODY, None),
        "re-serialised": (json.dumps(json.loads(BODY), separators=(",", ":")), good),
    }[case]


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_bad_signatures_are_refused_with_401(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body, signature = refused_request(case, now_ms())
    agent = agent_with(api_key=KEY, handler="test_webhooks:record_event")
    async with client_for(create_app(agent)) as client:
        response = await post(client, body, signature)
    assert response.status_code == 401
    assert response.text == "invalid signature"  # the reason is for the log only
    assert received == []
    [line] = [r for r in caplog.records if r.name == "callbrain.server.webhooks"]
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert message.startswith("webhook from 127.0.0.1 refused: ")
    assert REFUSALS[case] in message
    assert_no_secrets_logged(caplog, *([signature] if signature else []))


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        "[1, 2]",
        '{"call": {"call_id": "c"}}',
        '{"event": "call_ended", "call": 3}',
    ],
)
async def test_a_verified_body_that_is_not_an_event_is_a_400(body: str) -> None:
    async with client_for(create_app(agent_with(api_key=KEY))) as client:
        response = await post(client, body, sdk_sign(body, KEY))
    assert response.status_code == 400


async def test_a_failing_handler_is_a_500_without_its_error_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handler(event: WebhookEvent) -> None:
        raise RuntimeError("db password hunter2 rejected")

    async with client_for(create_app(agent_with(api_key=KEY), on_webhook=handler)) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY))
    assert response.status_code == 500
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    [failure] = [r for r in caplog.records if r.name == "callbrain.server.webhooks"]
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert "hunter2" in caplog.text  # the traceback is in the log, for the operator
    assert_no_secrets_logged(caplog)


async def test_a_handler_that_hangs_is_a_500() -> None:
    release = asyncio.Event()

    async def handler(event: WebhookEvent) -> None:
        await release.wait()

    endpoint = webhook_endpoint(KEY, handler, WebhookSettings(handler_timeout_s=0.2))
    app = Starlette(routes=[Route("/webhook", endpoint, methods=["POST"])])
    async with client_for(app) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY))
    assert response.status_code == 500


async def test_an_oversized_body_is_a_413_before_any_check() -> None:
    endpoint = webhook_endpoint(KEY, record_event, WebhookSettings(max_body_bytes=1024))
    app = Starlette(routes=[Route("/webhook", endpoint, methods=["POST"])])
    big = '{"event": "call_ended", "pad": "' + "x" * 2000 + '"}'

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(3):
            yield b"x" * 600

    async with client_for(app) as client:
        declared = await post(client, big, sdk_sign(big, KEY))
        streamed = await client.post(
            "/webhook", content=chunked(), headers={"X-Retell-Signature": sdk_sign(big, KEY)}
        )
        fine = await post(client, BODY, sdk_sign(BODY, KEY))
    assert (declared.status_code, streamed.status_code, fine.status_code) == (413, 413, 204)
    assert len(received) == 1


# --- Configuration -----------------------------------------------------------


async def test_without_an_api_key_there_is_no_route() -> None:
    async with client_for(create_app(agent_with())) as client:
        response = await post(client, BODY, sdk_sign(BODY, KEY))
    assert response.status_code == 404


async def test_the_route_takes_only_post() -> None:
    async with client_for(create_app(agent_with(api_key=KEY))) as client:
        response = await client.get("/webhook")
    assert response.status_code == 405


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("test_webhooks:no_such_function", "has no attribute 'no_such_function'"),
        ("no_such_module_9c1:handle", "no module named 'no_such_module_9c1'"),
        ("test_webhooks", "expected 'package.module:function'"),
        ("test_webhooks:KEY", "a str, not a function"),
        ("test_webhooks:two_arguments", "must take one argument"),
    ],
)
def test_a_bad_handler_reference_fails_at_app_creation(ref: str, problem: str) -> None:
    with pytest.raises(AgentConfigError) as info:
        create_app(agent_with(api_key=KEY, handler=ref))
    message = str(info.value)
    assert "server.webhooks.handler" in message and problem in message
    assert not message.startswith("tool") and "tool reference" not in message


def test_a_handler_without_an_api_key_is_a_config_error() -> None:
    with pytest.raises(AgentConfigError, match="api_key"):
        create_app(agent_with(handler="test_webhooks:record_event"))
    with pytest.raises(AgentConfigError, match="api_key"):
        create_app(agent_with(), on_webhook=record_event)


def test_an_empty_api_key_is_a_config_error() -> None:
    with pytest.raises(AgentConfigError, match="empty"):
        create_app(agent_with(api_key=""))
