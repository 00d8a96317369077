"""``GET /metrics`` on a real server after real calls, parsed with prometheus_client's
own parser: the numbers must agree with what the calls did, and only those
allowed may read them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from observing import serve
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from callbrain.agent import Agent
from callbrain.llm.config import AnthropicConfig, OpenAIConfig
from callbrain.observe.settings import MetricsSettings
from callbrain.server.settings import ServerSettings
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeAnthropicServer, FakeOpenAIServer, FakeToolCall, Reply
from callbrain.tools import tool

TOKEN = "scrape-Tk7pQ2vLx9RzW4mN"
OUTSIDE = {"X-Forwarded-For": "203.0.113.9"}
"""From a trusted proxy on loopback: the client is somewhere else."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@tool
def check_availability(day: str) -> dict[str, Any]:
    """Free appointment times on a day.

    Args:
        day: The day, e.g. "friday".
    """
    return {"day": day, "free": ["09:00"]}


@pytest.fixture
async def primary() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def backup() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as server:
        yield server


def make_agent(
    primary: FakeOpenAIServer,
    backup: FakeAnthropicServer | None = None,
    **server: Any,
) -> Agent:
    llm = OpenAIConfig(
        provider="openai", model="main", base_url=primary.base_url, api_key="k", max_retries=0
    )
    fallbacks = []
    if backup is not None:
        fallbacks.append(
            AnthropicConfig(
                provider="anthropic",
                model="spare",
                base_url=backup.base_url,
                api_key="k",
                max_retries=0,
            )
        )
    # Calls only from loopback; a client behind the (trusted) proxy is refused.
    access = {"trusted_proxies": ["127.0.0.1/32"], "allow_ips": ["127.0.0.1/32"]}
    settings = {"access": access, **server}
    return Agent(
        name="metered",
        begin_message="Hello.",
        holding_messages=["One moment."],
        tool_filler_after_s=None,
        llm=llm,
        fallback_llms=fallbacks,
        tools=[check_availability],
        server=ServerSettings.model_validate(settings),
    )


async def get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url, headers=headers)


async def scrape(http: str, headers: dict[str, str] | None = None) -> Samples:
    response = await get(http + "/metrics", headers)
    assert response.status_code == 200, response.status_code
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def histogram_count(samples: Samples, name: str, **labels: str) -> float:
    """The ``_count``, after checking the buckets are cumulative and end at it."""
    buckets = sorted(
        (float(dict(key)["le"]), v)
        for (sample, key), v in samples.items()
        if sample == name + "_bucket" and set(labels.items()) <= key
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    count = value(samples, name + "_count", **labels)
    assert counts[-1] == count
    return count


# --------------------------------------------------------------------- counts


async def test_metrics_agree_with_what_the_calls_did(
    primary: FakeOpenAIServer, backup: FakeAnthropicServer
) -> None:
    primary.reset(
        Reply(status=500),  # turn 1: fails over to the backup
        Reply(
            "",
            tool_calls=[
                FakeToolCall("check_availability", {"day": "friday"}),
                FakeToolCall("made_up_tool", {}),  # a name the model invented
            ],
        ),
        Reply("Friday at nine."),
        Reply("Let me tell you all about our long opening hours.", stall_after=2),
        Reply("Sure."),
    )
    backup.script(Reply("Backup here."))
    async with serve(make_agent(primary, backup)) as served:
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
            assert (await call.ask("Hi")).text == "Backup here."
            assert (await call.ask("Anything on Friday?")).text == "One moment. Friday at nine."
            # A barge-in: the caller speaks while the long answer is going out.
            interrupted = await call.say("What are your hours?")
            await call.wait_for(lambda _: bool(call.response_turn(interrupted).text))
            await call.send("{not json")
            await call.send(b"\x00\x01")
            assert (await call.ask("Never mind.")).text == "Sure."
            assert call.checker.violations == []
        with pytest.raises(InvalidStatus):
            async with connect(served.ws + "/call-2", additional_headers=OUTSIDE):
                pass
        await served.probe.wait(1)
        samples = await scrape(served.http)

    assert value(samples, "callbrain_calls_total") == 1
    assert value(samples, "callbrain_calls_active") == 0
    assert value(samples, "callbrain_turns_total", kind="begin", outcome="completed") == 1
    assert value(samples, "callbrain_turns_total", kind="response", outcome="completed") == 3
    assert value(samples, "callbrain_turns_total", kind="response", outcome="superseded") == 1
    # Every response turn spoke (the tool turn's holding line is its first frame).
    assert histogram_count(samples, "callbrain_turn_first_frame_seconds") == 4
    assert value(samples, "callbrain_turn_first_frame_seconds_sum") > 0
    # Requests: the failed-over one answered by the backup, two for the tool turn,
    # the interrupted one (its first token came) and the last one.
    first_token = "callbrain_llm_first_token_seconds"
    assert histogram_count(samples, first_token, provider="anthropic", model="spare") == 1
    assert histogram_count(samples, first_token, provider="openai", model="main") == 4
    assert value(samples, "callbrain_llm_failovers_total", provider="openai") == 1
    tokens = "callbrain_llm_tokens_total"
    # The fakes report 12 in / 7 out for each finished stream; the interrupted one never finished.
    assert value(samples, tokens, provider="openai", model="main", kind="input") == 36
    assert value(samples, tokens, provider="openai", model="main", kind="output") == 21
    assert value(samples, tokens, provider="anthropic", model="spare", kind="input") == 12
    assert value(samples, tokens, provider="anthropic", model="spare", kind="output") == 7
    tools = "callbrain_tool_calls_total"
    assert value(samples, tools, tool="check_availability", outcome="ok") == 1
    assert value(samples, tools, tool="unknown", outcome="error") == 1
    assert not any(dict(key).get("tool") == "made_up_tool" for _, key in samples)
    assert histogram_count(samples, "callbrain_tool_duration_seconds", tool="check_availability")
    ignored = "callbrain_frames_ignored_total"
    assert value(samples, ignored, reason="malformed") == 1
    assert value(samples, ignored, reason="binary") == 1
    assert value(samples, ignored, reason="oversized") == 0
    assert (ignored, frozenset({("reason", "oversized")})) in samples  # shown at 0
    assert value(samples, "callbrain_sockets_refused_total", reason="address") == 1
    assert value(samples, "callbrain_sockets_refused_total", reason="draining") == 0
    assert value(samples, "callbrain_records_dropped_total") == 0


async def test_a_reconnect_is_not_a_new_call(primary: FakeOpenAIServer) -> None:
    async with serve(make_agent(primary)) as served:
        for socket in (1, 2):  # Retell reconnects with the same call id
            async with RetellClient.connect(served.ws, "call-1") as call:
                await call.expect_config()
                await call.expect_begin()
                assert value(await scrape(served.http), "callbrain_calls_active") == 1
            await served.probe.wait(socket)
        samples = await scrape(served.http)
    assert value(samples, "callbrain_calls_total") == 1
    assert value(samples, "callbrain_reconnects_total") == 1
    assert value(samples, "callbrain_calls_active") == 0
    # A reconnect's greeting is empty, but it is still a begin turn.
    assert value(samples, "callbrain_turns_total", kind="begin", outcome="completed") == 2


async def test_failovers_before_a_barge_in_are_counted(
    primary: FakeOpenAIServer, backup: FakeAnthropicServer
) -> None:
    # The turn ends (superseded) while its stream is still open: the failover
    # that happened before must be in its record already.
    primary.reset(Reply(status=500), Reply("Fine."))
    backup.script(Reply("A long, long answer from the backup.", stall_after=1))
    async with serve(make_agent(primary, backup)) as served:
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
            first = await call.say("Hi")
            await call.wait_for(lambda _: bool(call.response_turn(first).text))
            assert (await call.ask("Sorry, go on.")).text == "Fine."
        await served.probe.wait(1)
        samples = await scrape(served.http)
    assert value(samples, "callbrain_turns_total", kind="response", outcome="superseded") == 1
    assert value(samples, "callbrain_llm_failovers_total", provider="openai") == 1


async def test_the_records_dropped_count_is_read_at_each_scrape(
    primary: FakeOpenAIServer,
) -> None:
    dropped = [0]
    async with serve(make_agent(primary)) as served:
        assert value(await scrape(served.http), "callbrain_records_dropped_total") == 0
        served.app.state.telemetry.metrics.count_records_dropped(lambda: dropped[0])
        dropped[0] = 5
        assert value(await scrape(served.http), "callbrain_records_dropped_total") == 5


async def test_records_the_database_could_not_take_are_exported(
    primary: FakeOpenAIServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory: no database can be made under it")
    records = {"url": str(blocker / "calls.db"), "flush_interval_s": 0.01}
    async with serve(make_agent(primary, records=records)) as served:
        recorder = served.app.state.runtime.recorder
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
        await served.probe.wait(1)
        await recorder.flush()
        samples = await scrape(served.http)
    assert recorder.dropped > 0
    assert value(samples, "callbrain_records_dropped_total") == recorder.dropped


async def test_each_app_counts_its_own_calls(primary: FakeOpenAIServer) -> None:
    async with serve(make_agent(primary)) as one, serve(make_agent(primary)) as two:
        async with RetellClient.connect(one.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
        await one.probe.wait(1)
        assert value(await scrape(one.http), "callbrain_calls_total") == 1
        assert value(await scrape(two.http), "callbrain_calls_total") == 0


# --------------------------------------------------------------------- access


async def test_only_loopback_may_scrape_by_default(primary: FakeOpenAIServer) -> None:
    async with serve(make_agent(primary)) as served:
        assert (await get(served.http + "/metrics")).status_code == 200
        refused = await get(served.http + "/metrics", OUTSIDE)
        assert refused.status_code == 403 and refused.content == b""


async def test_a_bearer_token_lets_others_scrape_and_is_never_logged(
    primary: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = TOKEN[:-3] + "AAA"
    agent = make_agent(primary, metrics={"token": TOKEN})
    async with serve(agent) as served:
        url = served.http + "/metrics"
        missing = await get(url, OUTSIDE)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        bad = await get(url, {**OUTSIDE, "Authorization": f"Bearer {wrong}"})
        assert bad.status_code == 401
        assert (await get(url, {**OUTSIDE, "Authorization": f"Basic {TOKEN}"})).status_code == 401
        await scrape(served.http, {**OUTSIDE, "Authorization": f"Bearer {TOKEN}"})
        await scrape(served.http)  # loopback still needs none
    refusals = [r.getMessage() for r in caplog.records if r.name == "callbrain.observe"]
    assert refusals == ["refused a /metrics scrape from 203.0.113.9: no valid token"] * 3
    assert not any(TOKEN in r.getMessage() or wrong in r.getMessage() for r in caplog.records)


async def test_allow_ips_replaces_loopback(primary: FakeOpenAIServer) -> None:
    agent = make_agent(primary, metrics={"allow_ips": ["203.0.113.0/24"]})
    async with serve(agent) as served:
        assert (await get(served.http + "/metrics", OUTSIDE)).status_code == 200
        assert (await get(served.http + "/metrics")).status_code == 403


async def test_metrics_can_be_turned_off(primary: FakeOpenAIServer) -> None:
    primary.reset(default=Reply("Still here."))
    async with serve(make_agent(primary, metrics={"enabled": False})) as served:
        assert (await get(served.http + "/metrics")).status_code == 404
        assert served.app.state.telemetry.metrics is None
        async with RetellClient.connect(served.ws, "call-1") as call:
            await call.expect_config()
            await call.expect_begin()
            assert (await call.ask("Hi")).text == "Still here."


def test_an_empty_token_is_a_mistake_not_no_token() -> None:
    with pytest.raises(ValidationError, match=r"is empty \(is its \$\{ENV\} variable set\?\)"):
        MetricsSettings.model_validate({"token": " "})
    with pytest.raises(ValidationError):
        MetricsSettings.model_validate({"allow_ips": ["not-a-network"]})
