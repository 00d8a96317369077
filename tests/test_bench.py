"""``callbrain bench``: the load runs, the report has every number, and the
protocol checker inside it counts what a broken server does. Nothing here
asserts a latency: the machines are shared, so the numbers are only reported."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import orjson
import pytest_asyncio
from misbehaving_server import app as misbehaving_app

from callbrain.agent import Agent
from callbrain.llm.config import OpenAIConfig
from callbrain.testing import FakeOpenAIServer, Reply, serve_agent, serve_asgi
from callbrain.testing.bench import LoadOptions, percentiles, run_load
from callbrain.testing.bench_run import bench_agent
from callbrain.testing.serve import free_port

QUICK = LoadOptions(calls=6, duration_s=1.5, ramp_s=0.2, pause_s=0.1, ttft_s=0.0, seed=7)


@pytest_asyncio.fixture
async def misbehaving() -> AsyncIterator[str]:
    async with serve_asgi(misbehaving_app) as http:
        yield "ws" + http.removeprefix("http")


async def bench_command(*args: str, timeout: float = 120) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbrain",
        "bench",
        *args,
        "--json",
        "-",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    report = orjson.loads(out) if proc.returncode == 0 else {}
    return proc.returncode, report, err.decode()


async def test_bench_starts_its_own_server_and_reports_every_number() -> None:
    code, report, err = await bench_command(
        "--calls",
        "5",
        "--duration",
        "2",
        "--ramp",
        "0.5",
        "--pause",
        "0.2",
        "--ttft",
        "0.05",
        "--token-rate",
        "200",
        "--seed",
        "1",
    )
    assert code == 0, err
    run = report  # the main run's numbers are at the top
    assert run["calls"] == run["connected"] == 5
    assert run["turns"] >= 5
    assert set(run["added_latency_ms"]) == {"p50", "p95", "p99"}
    assert run["added_latency_ms"]["p50"] is not None
    assert set(run["ping_rtt_ms"]) == {"p50", "p99"} and run["ping_rtt_ms"]["p99"] is not None
    for counter in ("missed_pings", "stale_frames", "incomplete_turns", "errors"):
        assert run[counter] == 0, (counter, run)
    assert run["server_cpu_s"] > 0 and run["server_peak_rss_mb"] > 10
    assert run["server_cpu_ms_per_turn"] > 0
    assert report["records"] is True  # as in production: the cost of recording is in
    assert report["fake_llm"]["ttft_s"] == 0.05 and report["fake_llm"]["cpu_s"] >= 0
    assert "added latency" in err  # the table, on stderr when the JSON is on stdout


async def test_bench_can_load_the_anthropic_backend() -> None:
    code, report, err = await bench_command(
        *("--provider", "anthropic", "--calls", "3", "--duration", "1.5", "--ramp", "0.3"),
        *("--pause", "0.2", "--ttft", "0.05", "--token-rate", "200", "--seed", "1"),
    )
    assert code == 0, err
    assert report["fake_llm"]["provider"] == "anthropic"
    assert not report["fake_llm"]["url"].endswith("/v1")  # the Anthropic SDK adds it
    assert report["connected"] == 3 and report["turns"] >= 3
    for counter in ("missed_pings", "stale_frames", "incomplete_turns", "errors"):
        assert report[counter] == 0, (counter, report)
    # An agent on the wrong backend would still complete turns (with its
    # fallback line), so check the agent the bench serves, too.
    assert bench_agent(report["fake_llm"]["url"], "anthropic")["llm"]["provider"] == "anthropic"


async def test_compare_runs_the_same_load_against_a_second_server() -> None:
    port = free_port()
    llm = OpenAIConfig(
        provider="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0
    )
    agent = Agent(name="other", begin_message="Hello.", llm=llm)
    async with serve_agent(agent) as other:
        code, report, err = await bench_command(
            "--calls",
            "3",
            "--duration",
            "1.5",
            "--ramp",
            "0.3",
            "--pause",
            "0.2",
            "--ttft",
            "0.05",
            "--token-rate",
            "200",
            "--fake-llm-port",
            str(port),
            "--compare",
            other,
            "--no-records",
        )
    assert code == 0, err
    assert report["records"] is False
    second = report["compare"]
    assert second["target"] == other and "server_cpu_s" not in second
    assert second["connected"] == 3 and second["errors"] == 0 and second["turns"] > 0
    assert set(report["ratios"]) == {
        "added_latency_ms.p50",
        "added_latency_ms.p95",
        "added_latency_ms.p99",
        "ping_rtt_ms.p50",
        "ping_rtt_ms.p99",
    }
    assert "second / first" in err


async def test_callbrain_under_barge_in_load_sends_no_stale_frame() -> None:
    slow = Reply("One moment, let me look that up for you right now.", chunk_delay=0.03)
    async with FakeOpenAIServer(default=slow) as fake:
        llm = OpenAIConfig(provider="openai", base_url=fake.base_url, api_key="k")
        agent = Agent(name="t", begin_message="Hello.", llm=llm)
        async with serve_agent(agent) as url:
            options = LoadOptions(**{**QUICK.__dict__, "interrupt_rate": 0.7})
            report = await run_load(url, options)
    assert report.connected == 6 and report.interrupted > 0
    assert report.stale_frames == 0 and report.incomplete_turns == 0
    assert report.errors == 0, report.error_samples


async def test_the_bench_counts_a_broken_servers_stale_frames(misbehaving: str) -> None:
    options = LoadOptions(**{**QUICK.__dict__, "interrupt_rate": 1.0})
    report = await run_load(misbehaving + "/stale_frame/llm-websocket", options)
    assert report.stale_frames > 0
    assert report.violations["stale_frame"] == report.stale_frames


async def test_the_bench_counts_unfinished_turns(misbehaving: str) -> None:
    incomplete = LoadOptions(**{**QUICK.__dict__, "reply_timeout_s": 0.5})
    report = await run_load(misbehaving + "/turn_incomplete/llm-websocket", incomplete)
    assert report.incomplete_turns > 0 and report.errors == 0


async def test_a_server_that_hangs_up_is_counted_not_a_crash(misbehaving: str) -> None:
    report = await run_load(misbehaving + "/closes/llm-websocket", QUICK)
    assert report.connected == QUICK.calls
    assert report.errors >= QUICK.calls
    assert "the server closed the socket (code 1011)" in report.error_samples[0]


async def test_an_unreachable_server_is_an_error_not_a_crash() -> None:
    options = LoadOptions(calls=2, duration_s=0.1, ramp_s=0.0)
    report = await run_load(f"ws://127.0.0.1:{free_port()}/llm-websocket", options)
    assert report.connected == 0 and report.errors == 2
    assert "could not connect" in report.error_samples[0]


def test_the_bench_agent_records_to_its_own_file_or_not_at_all() -> None:
    from callbrain.records.settings import RecordsSettings
    from callbrain.testing.bench_run import bench_agent

    on = Agent.model_validate(bench_agent("http://127.0.0.1:1/v1", records="/tmp/bench/calls.db"))
    assert on.server.records == RecordsSettings(url="/tmp/bench/calls.db")
    assert Agent.model_validate(bench_agent("http://127.0.0.1:1/v1")).server.records is False


def test_percentiles() -> None:
    assert percentiles([], (50,)) == {"p50": None}
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values, (50, 95, 99)) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([3.0], (99,)) == {"p99": 3.0}
