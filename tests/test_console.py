"""The web console over real sockets, without a browser: who gets in (the login,
the session cookie, loopback, requests from other sites), that nothing secret
is ever in a page, the playground's socket, the live events, the calls list's
filters and the scenario download. The browser tests (test_console_browser.py)
drive the pages themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from console_support import SECRETS, TOKEN, Served, client, console_agent, serve_console
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent
from callbrain.call.record import CallRecord, TurnRecord
from callbrain.console.live import LiveFeed
from callbrain.console.auth import ConsoleAuth
from callbrain.console.settings import ConsoleSettings
from callbrain.records.export import export_scenario, scenario_yaml
from callbrain.records.settings import RecordsSettings
from callbrain.server.settings import ServerSettings
from callbrain.testing import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, FakeToolCall, Reply

HTML = {"Accept": "text/html"}


@contextlib.asynccontextmanager
async def console(
    tmp_path: Path, *replies: Reply, records: bool = True, **options: object
) -> AsyncIterator[tuple[Served, FakeOpenAIServer]]:
    async with FakeOpenAIServer(*replies, default=Reply("Sure.")) as fake:
        database = tmp_path / "calls.db" if records else None
        async with serve_console(console_agent(fake, database, **options)) as served:  # type: ignore[arg-type]
            yield served, fake


@contextlib.asynccontextmanager
async def playground_call(
    served: Served, http: httpx.AsyncClient, call_id: str
) -> AsyncIterator[RetellClient]:
    """The browser's side of a playground call, from Python: the session cookie and
    the console's own origin on the handshake."""
    cookie = "; ".join(f"{name}={value}" for name, value in http.cookies.items())
    headers = {"Cookie": cookie, **served.origin}
    async with connect(served.socket_url(call_id), additional_headers=headers) as ws:
        call = RetellClient(ws)
        try:
            yield call
        finally:
            call._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call._reader


async def recorded(served: Served) -> None:
    """Once the server has finished with every call, and written them."""
    await asyncio.wait_for(served.app.state.runtime.idle.wait(), 10)
    recorder = served.app.state.runtime.recorder
    if recorder is not None:
        await recorder.flush()


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


async def test_a_playground_call_is_served_like_retells_and_recorded_as_playground(
    tmp_path: Path,
) -> None:
    replies = [
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "tuesday"})]),
        Reply("Tuesday at nine."),
    ]
    options = {"wait_for_call_details": True}
    async with console(tmp_path, *replies, **options) as (served, _), client(served) as http:
        async with playground_call(served, http, "playground-abc123") as call:
            await call.expect_config()
            await call.send_call_details({"retell_llm_dynamic_variables": {"first_name": "Robin"}})
            assert "Robin" in (await call.expect_begin()).text
            reply = await call.ask("Anything on Tuesday?")
            assert reply.text.endswith("Tuesday at nine.")
            assert call.checker.violations == []
        await recorded(served)
        found = (await http.get("/console/calls?kind=playground")).text
        assert "playground-abc123" in found
        assert "playground-abc123" not in (await http.get("/console/calls?kind=calls")).text
        page = (await http.get("/console/calls/playground-abc123")).text
        assert "check_availability" in page and "Tuesday at nine." in page


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


# --------------------------------------------------------------------- calls


async def test_live_events_follow_a_call_from_start_to_end(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        events: list[dict[str, object]] = []
        snapshot = asyncio.Event()
        ended = asyncio.Event()

        async def watch() -> None:
            async with http.stream("GET", "/console/events") as stream:
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        data = orjson.loads(line.removeprefix("data: "))
                        if kind == "snapshot":
                            snapshot.set()
                        else:
                            events.append(data)
                            if data["end"] != "open":
                                ended.set()
                                return

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(snapshot.wait(), 5)
        async with RetellClient.connect(served.retell_url, "call_live_1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hello?")
        await asyncio.wait_for(ended.wait(), 5)
        await watcher
        assert all(e["call_id"] == "call_live_1" for e in events)
        assert events[0]["live"] is True
        assert any(e["responding"] for e in events)
        last = events[-1]
        assert last["live"] is False and last["end"] == "hangup" and last["turns"] == 1


async def test_the_event_stream_ends_when_the_server_drains(tmp_path: Path) -> None:
    async with console(tmp_path) as (served, _), client(served) as http:
        async with http.stream("GET", "/console/events") as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            served.app.state.runtime.draining = True
            rest = [line async for line in lines]  # the stream ends by itself
        assert all(not line.startswith("data: ") for line in rest)


async def test_the_calls_list_searches_and_filters(tmp_path: Path) -> None:
    slow = Reply("Let me see.", ttft=0.3)
    async with console(tmp_path, slow) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_slow_1") as call:
            await call.expect_config()
            await call.send_call_details({"from_number": "+14155550199", "to_number": "+1415"})
            await call.expect_begin()
            await call.ask("Hello?")
        async with playground_call(served, http, "playground-quick1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hi?")
            await call.close()
        await recorded(served)

        async def listed(query: str) -> set[str]:
            page = (await http.get(f"/console/calls{query}")).text
            return {cid for cid in ("call_slow_1", "playground-quick1") if cid in page}

        assert await listed("") == {"call_slow_1", "playground-quick1"}
        assert await listed("?q=5550199") == {"call_slow_1"}  # the caller's number
        assert await listed("?q=QUICK") == {"playground-quick1"}
        assert await listed("?kind=playground") == {"playground-quick1"}
        assert await listed("?kind=calls") == {"call_slow_1"}
        assert await listed("?min_ms=250") == {"call_slow_1"}
        assert await listed("?end=hangup") == {"call_slow_1", "playground-quick1"}
        assert await listed("?end=drop") == set()
        assert await listed("?q=%25") == set()  # a LIKE wildcard is just a character


async def test_the_scenario_download_is_callbrain_calls_export(tmp_path: Path) -> None:
    from callbrain.records.read import load_call
    from callbrain.records.settings import database_url

    replies = [
        Reply("", tool_calls=[FakeToolCall("check_availability", {"day": "friday"})]),
        Reply("Friday at three."),
    ]
    async with console(tmp_path, *replies) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_export_1") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Friday?")
        await recorded(served)
        answer = await http.get("/console/calls/call_export_1/scenario.yaml")
        assert answer.headers["content-disposition"] == 'attachment; filename="call_export_1.yaml"'
        from callbrain.records.database import open_engine

        engine = open_engine(database_url(str(tmp_path / "calls.db")), for_reading=True)
        async with engine.connect() as connection:
            stored = await load_call(connection, "call_export_1")
        await engine.dispose()
        assert stored is not None
        assert answer.text == scenario_yaml(export_scenario(stored))
        assert yaml.safe_load(answer.text)["steps"][0]["expect"]["tools"][0]["name"] == (
            "check_availability"
        )


async def test_with_records_off_the_last_calls_are_still_shown(tmp_path: Path) -> None:
    async with console(tmp_path, records=False) as (served, _), client(served) as http:
        async with RetellClient.connect(served.retell_url, "call_no_db") as call:
            await call.expect_config()
            await call.expect_begin()
            await call.ask("Hello?")
        page = (await http.get("/console/calls")).text
        assert "call_no_db" in page and "records are off" in page
        assert (await http.get("/console/calls/call_no_db")).status_code == 200
        assert (await http.get("/console/calls/call_unknown")).status_code == 404


# ------------------------------------------------------------------ live feed


def test_a_browser_that_does_not_keep_up_costs_its_queue_and_is_sent_a_snapshot() -> None:
    feed = LiveFeed(queue_events=8, max_watchers=2)
    slow, other = feed.watch(), feed.watch()
    assert slow is not None and other is not None
    assert feed.watch() is None  # max_watchers
    call = CallRecord("call_busy", "clinic")
    feed.call_started(call)
    for n in range(1, 1000):
        turn = TurnRecord(n, "response", arrived=time.perf_counter())
        call.turns.append(turn)
        feed.turn_started(call, turn)
        feed.turn_ended(call, turn)
    assert len(slow.events) <= 8 and slow.lagged  # dropped, to be resynced
    snapshot = orjson.loads(feed.snapshot().split(b"data: ", 1)[1])
    assert snapshot["calls"][0]["turns"] == 999
    feed.unwatch(slow)
    feed.unwatch(other)
    feed.call_ended(call)  # nobody watching: nothing made, nothing queued
    assert feed.find("call_busy") is call and not feed.open


async def test_the_live_view_is_redacted_like_the_records(tmp_path: Path) -> None:
    options = {"console": {}}
    async with FakeOpenAIServer(Reply("Booked for 555 0199.")) as fake:
        agent = console_agent(fake, tmp_path / "calls.db", **options)
        records = RecordsSettings(url=str(tmp_path / "calls.db"), redact="pii")
        agent = agent.model_copy(
            update={"server": agent.server.model_copy(update={"records": records})}
        )
        async with serve_console(agent) as served, client(served) as http:
            async with RetellClient.connect(served.retell_url, "call_pii") as call:
                await call.expect_config()
                await call.send_call_details({"from_number": "+14155550199"})
                await call.expect_begin()
                await call.ask("My number is 415 555 0199")
                live = (await http.get("/console/calls/call_pii")).text
                listed = (await http.get("/console/calls")).text
            for page in (live, listed):
                assert "0199" not in page and "[number]" in page
