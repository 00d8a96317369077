"""Who gets into the web console, over real sockets: the setting, the login,
the session cookie, loopback, requests from other sites, the playground's
socket, and that nothing secret is ever in a page."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from console_support import (
    HTML,
    SECRETS,
    TOKEN,
    client,
    console,
    console_agent,
    playground_call,
    recorded,
    serve_console,
)
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent
from callbrain.console.auth import ConsoleAuth
from callbrain.console.settings import ConsoleSettings
from callbrain.server.settings import ServerSettings
from callbrain.testing.fake_llm import FakeOpenAIServer

# ------------------------------------------------------------------ settings


def test_the_console_is_off_unless_set_and_one_setting_turns_it_on() -> None:
    assert ServerSettings().console is False
    on = ServerSettings.model_validate({"console": True})
    assert on.console is True
    with pytest.raises(ValidationError, match="empty"):
        ConsoleSettings.model_validate({"token": " "})
    with pytest.raises(ValidationError, match="origin"):
        ConsoleSettings.model_validate({"origins": ["console.example.com"]})


async def test_off_by_default_there_is_no_console(tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        agent = console_agent(fake, None)
        agent = agent.model_copy(
            update={"server": agent.server.model_copy(update={"console": False})}
        )
        async with serve_console(agent) as served, client(served, login=False) as http:
            assert (await http.get("/console/calls", headers=HTML)).status_code == 404
            assert served.app.state.console is None


async def test_with_no_token_set_one_is_made_logged_once_and_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "callbrain.console")
    async with FakeOpenAIServer() as fake:
        agent = Agent.model_validate(
            {
                "name": "clinic",
                "llm": {"provider": "openai", "base_url": fake.base_url, "api_key": "k"},
                "server": {"console": True, "records": False},
            }
        )
        async with serve_console(agent) as served:
            token = served.app.state.console.auth.generated_token
            assert token and len(token) >= 24
            lines = [r.getMessage() for r in caplog.records if token in r.getMessage()]
            assert len(lines) == 1 and "/console" in lines[0]
            async with httpx.AsyncClient(base_url=served.http) as http:
                answer = await http.post(
                    "/console/login", data={"token": token}, headers=served.origin
                )
                assert answer.status_code == 303
                assert "callbrain_console" in answer.cookies


# --------------------------------------------------------------------- login


async def test_pages_want_a_login_and_a_login_sets_a_strict_httponly_cookie(
    tmp_path: Path,
) -> None:
    async with console(tmp_path) as (served, _), client(served, login=False) as http:
        page = await http.get("/console/calls?q=x", headers=HTML)
        assert page.status_code == 303
        assert page.headers["location"] == "/console/login?next=%2Fconsole%2Fcalls%3Fq%3Dx"
        for path in ("/console/events", "/console/calls/x/scenario.yaml", "/console/protocol.json"):
            assert (await http.get(path)).status_code == 401, path
        wrong = await http.post("/console/login", data={"token": "nope"}, headers=served.origin)
        assert wrong.status_code == 401 and "not right" in wrong.text
        assert not http.cookies
        right = await http.post(
            "/console/login",
            data={"token": TOKEN, "next": "/console/playground"},
            headers=served.origin,
        )
        assert right.status_code == 303 and right.headers["location"] == "/console/playground"
        cookie = right.headers["set-cookie"].lower()
        for flag in ("httponly", "samesite=strict", "path=/console"):
            assert flag in cookie
        assert (await http.get("/console/calls", headers=HTML)).status_code == 200
        # Away to another site after a login: never.
        elsewhere = await http.post(
            "/console/login",
            data={"token": TOKEN, "next": "//evil.example/"},
            headers=served.origin,
        )
        assert elsewhere.headers["location"] == "/console/calls"
        # Logging out ends that session, even for a copy of its cookie.
        session = http.cookies["callbrain_console"]
        await http.post("/console/logout", headers=served.origin)
        async with client(served, login=False) as copy:
            copy.cookies.set("callbrain_console", session)
            assert (await copy.get("/console/events")).status_code == 401


def test_a_forged_altered_or_expired_session_is_refused() -> None:
    now = [1_000_000.0]
    auth = ConsoleAuth(
        ConsoleSettings(token=TOKEN, session_hours=1), lambda peer, _: None, clock=lambda: now[0]
    )
    session = auth.new_session()
    assert auth.session_valid(session)
    expires, nonce, signature = session.split(".")
    assert not auth.session_valid(f"{int(expires) + 3600}.{nonce}.{signature}")
    assert not auth.session_valid(f"{expires}.{nonce}.{'0' * len(signature)}")
    for junk in ("", "a.b.c", "1.2", "..", None):
        assert not auth.session_valid(junk)
    other = ConsoleAuth(ConsoleSettings(token=TOKEN), lambda peer, _: None, clock=lambda: now[0])
    assert not other.session_valid(session)  # another process's key
    now[0] += 3601
    assert not auth.session_valid(session)


async def test_failed_logins_are_limited_per_address(tmp_path: Path) -> None:
    options = {"console": {"login_attempts_per_minute": 3}}
    async with console(tmp_path, **options) as (served, _), client(served, login=False) as http:
        for _ in range(3):
            bad = await http.post("/console/login", data={"token": "guess"}, headers=served.origin)
            assert bad.status_code == 401
        # Even the right token waits now: guessing gets nowhere.
        blocked = await http.post("/console/login", data={"token": TOKEN}, headers=served.origin)
        assert blocked.status_code == 429


async def test_requests_from_other_sites_are_refused(tmp_path: Path) -> None:
    options = {"console": {"origins": ["https://console.example.com"]}}
    async with console(tmp_path, **options) as (served, _), client(served) as http:
        evil = {"Origin": "https://evil.example"}
        assert (await http.post("/console/logout", headers=evil)).status_code == 403
        assert (await http.post("/console/logout")).status_code == 403  # no Origin
        login = await http.post("/console/login", data={"token": TOKEN}, headers=evil)
        assert login.status_code == 403
        fetched = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        assert (await http.get("/console/events", headers=fetched)).status_code == 403
        assert (await http.get("/console/calls", headers=evil)).status_code == 403
        # A link followed from elsewhere is a navigation: allowed (Strict cookies stay home).
        link = {**HTML, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        async with client(served, login=False) as stranger:
            assert (await stranger.get("/console/calls", headers=link)).status_code == 303
            assert (await stranger.get("/console/login", headers=link)).status_code == 200
        proxied = {"Origin": "https://console.example.com"}
        assert (await http.get("/console/protocol.json", headers=proxied)).status_code == 200
        for name, value in {
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
        }.items():
            assert (await http.get("/console/calls")).headers[name] == value


async def test_loopback_without_a_token_only_when_allowed_and_not_through_a_proxy(
    tmp_path: Path,
) -> None:
    async with console(tmp_path) as (served, _), client(served, login=False) as http:
        assert (await http.get("/console/protocol.json")).status_code == 401
    options = {"console": {"allow_loopback_without_token": True}}
    async with console(tmp_path, **options) as (served, _), client(served, login=False) as http:
        assert (await http.get("/console/protocol.json")).status_code == 200
        # A proxy on this host that nobody listed in trusted_proxies: its clients log in.
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        assert (await http.get("/console/protocol.json", headers=forwarded)).status_code == 401
        assert (
            await http.get("/console/protocol.json", headers={"X-Real-IP": "1.2.3.4"})
        ).status_code == 401
    options = {
        "console": {"allow_loopback_without_token": True},
        "access": {"secret": SECRETS["socket"], "trusted_proxies": ["127.0.0.1/32"]},
    }
    async with console(tmp_path, **options) as (served, _), client(served, login=False) as http:
        far = {"X-Forwarded-For": "203.0.113.9"}
        assert (await http.get("/console/protocol.json", headers=far)).status_code == 401
        near = {"X-Forwarded-For": "127.0.0.1"}
        assert (await http.get("/console/protocol.json", headers=near)).status_code == 200


# ---------------------------------------------------------------- playground


async def test_the_playground_socket_refuses_strangers(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        cookie = {"Cookie": f"callbrain_console={http.cookies['callbrain_console']}"}
        attempts = {
            "no session": (served.socket_url("playground-abc123"), served.origin),
            "another site": (
                served.socket_url("playground-abc123"),
                {**cookie, "Origin": "http://evil.example"},
            ),
            "a Retell call's id": (served.socket_url("call_123456"), {**cookie, **served.origin}),
            "no such agent": (
                served.socket_url("playground-abc123", "other"),
                {**cookie, **served.origin},
            ),
        }
        for why, (url, headers) in attempts.items():
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403, why


# -------------------------------------------------------------------- secrets


async def test_nothing_secret_is_ever_in_a_page(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        async with playground_call(served, http, "playground-secrets") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hello?")
        await recorded(served)
        pages = [
            "/console/login",
            "/console/calls",
            "/console/calls?q=clinic",
            "/console/calls/playground-secrets",
            "/console/calls/playground-secrets/view",
            "/console/calls/playground-secrets/scenario.yaml",
            "/console/playground",
            "/console/protocol.json",
            "/console/static/playground.js",
        ]
        shown = [(await http.get(path, headers=HTML)).text for path in pages]
        async with http.stream("GET", "/console/events") as events:
            async for chunk in events.aiter_text():
                shown.append(chunk)
                break
        for text in shown:
            for name, secret in [*SECRETS.items(), ("console token", TOKEN)]:
                assert secret not in text, f"the {name} is shown"
