"""``callbrain bench``: start what the load needs, run it, report.

Without a URL the bench starts two processes of its own: ``callbrain fake-llm``
(the model, with a fixed time to first token and token rate) and ``callbrain
serve`` on an agent pointed at it, and samples the server's CPU time and peak
memory while the load runs. They are separate processes so that the server
gets a core of its own, as it would in production, and so its CPU time is
its own. ``--compare URL`` then runs the same load against a second server
(anyone's, pointed at the same fake) and prints the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from callbrain.extras import missing_extra
from callbrain.server.app import DEFAULT_PREFIX
from callbrain.testing.bench import LoadOptions, LoadReport, run_load
from callbrain.testing.serve import free_port

try:
    import psutil
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("testing", "callbrain bench") from exc

_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FakeModel:
    """How the bench's fake model answers, and on which wire format (the served
    agent uses the provider that speaks it)."""

    ttft_s: float = 0.3
    token_rate: float = 50.0
    text: str = (
        "Sure, we have a few openings next week. Tuesday at ten thirty and Thursday "
        "at two are both free. Which one works better for you?"
    )
    provider: Literal["openai", "anthropic"] = "openai"


@dataclass
class ProcessUsage:
    """A child process's CPU time during the load, and its peak resident memory."""

    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0


def raise_open_files_limit() -> int:
    """Thousands of calls need thousands of sockets; lift the soft limit to the hard one.

    Child processes (the server the bench starts) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


@contextlib.asynccontextmanager
async def child(args: list[str], port: int, name: str) -> AsyncIterator[psutil.Process]:
    """Run ``python -m callbrain *args`` until the block ends; ready once ``port`` accepts."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbrain", *args, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if proc.returncode is not None:
                log.seek(0)
                output = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{output}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} within 60 s")
            await asyncio.sleep(0.1)
        yield psutil.Process(proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def sampled(process: psutil.Process | None) -> AsyncIterator[ProcessUsage]:
    """CPU seconds used by ``process`` inside the block, and its peak RSS."""
    usage = ProcessUsage()
    if process is None:
        yield usage
        return

    def cpu() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def sample() -> None:
        usage.peak_rss_mb = max(usage.peak_rss_mb, process.memory_info().rss / 2**20)

    async def keep_sampling() -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                sample()
            await asyncio.sleep(0.25)

    before = cpu()
    sampler = asyncio.create_task(keep_sampling())
    try:
        yield usage
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        with contextlib.suppress(psutil.Error):
            sample()
            usage.cpu_s = cpu() - before


def bench_agent(
    llm_url: str, provider: str = "openai", records: str | None = None
) -> dict[str, Any]:
    """The agent the bench serves: a short greeting, no tools, the fake model;
    its call records in the SQLite file ``records`` (None: recording off)."""
    return {
        "name": "bench",
        "system_prompt": "You are a receptionist. Answer in one or two short sentences.",
        "begin_message": "Hi, thanks for calling. How can I help?",
        "llm": {
            "provider": provider,
            "model": "bench",
            "base_url": llm_url,
            "api_key": "bench",
            "max_retries": 0,
        },
        "server": {"records": {"url": records} if records is not None else False},
    }


@contextlib.asynccontextmanager
async def fake_model(model: FakeModel, port: int) -> AsyncIterator[psutil.Process]:
    args = ["fake-llm", "--provider", model.provider, "--port", str(port)]
    args += ["--ttft", str(model.ttft_s)]
    args += ["--token-rate", str(model.token_rate), "--text", model.text, "--log-level", "warning"]
    async with child(args, port, "callbrain fake-llm") as process:
        yield process


@contextlib.asynccontextmanager
async def callbrain_server(
    llm_url: str, provider: str = "openai", *, records: bool = True
) -> AsyncIterator[tuple[str, psutil.Process]]:
    """``callbrain serve`` on the bench agent; yields its Retell URL and its process.
    Its call records (on by default, as in production) go to a file of its own."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        agent = Path(folder) / "bench-agent.yaml"
        database = str(Path(folder) / "bench-calls.db") if records else None
        spec = bench_agent(llm_url, provider, database)
        agent.write_text(yaml.safe_dump(spec), encoding="utf-8")
        args = ["serve", "--agent", str(agent), "--port", str(port), "--log-level", "warning"]
        async with child(args, port, "callbrain serve") as process:
            yield f"ws://127.0.0.1:{port}{DEFAULT_PREFIX}", process


async def bench_one(
    url: str, options: LoadOptions, server: psutil.Process | None
) -> dict[str, Any]:
    """One load run against ``url``; the server's usage when we know its process."""
    async with sampled(server) as usage:
        report: LoadReport = await run_load(url, options)
    result = {"target": url, **report.to_json()}
    if server is not None:
        result["server_cpu_s"] = round(usage.cpu_s, 2)
        result["server_cpu_ms_per_turn"] = (
            round(usage.cpu_s * 1000 / report.turns, 2) if report.turns else None
        )
        result["server_peak_rss_mb"] = round(usage.peak_rss_mb, 1)
    return result


async def run_bench(
    url: str | None,
    options: LoadOptions,
    model: FakeModel,
    *,
    compare: str | None = None,
    fake_llm_port: int | None = None,
    records: bool = True,
) -> dict[str, Any]:
    """The whole ``callbrain bench`` run: the report as the JSON it prints.
    ``records``: whether the server started here records its calls."""
    limit = raise_open_files_limit()
    result: dict[str, Any] = {
        "options": {**asdict(options), "ramp_s": options.ramp},
        "fake_llm": asdict(model),
        "open_files_limit": limit,
        "cores": os.cpu_count(),
    }
    if url is None:
        result["records"] = records
    async with contextlib.AsyncExitStack() as stack:
        fake = None
        if url is None or fake_llm_port is not None:
            port = fake_llm_port or free_port()
            fake = await stack.enter_async_context(fake_model(model, port))
            # The OpenAI SDK wants /v1 in its base URL; Anthropic's adds it itself.
            suffix = "/v1" if model.provider == "openai" else ""
            result["fake_llm"]["url"] = f"http://127.0.0.1:{port}{suffix}"
        server = None
        if url is None:
            served = callbrain_server(result["fake_llm"]["url"], model.provider, records=records)
            target, server = await stack.enter_async_context(served)
        else:
            target = url
        async with sampled(fake) as fake_usage:
            runs = [await bench_one(target, options, server)]
            if compare is not None:
                runs.append(await bench_one(compare, options, None))
        if fake is not None:
            result["fake_llm"]["cpu_s"] = round(fake_usage.cpu_s, 2)
    # The main run's numbers at the top, so `jq .added_latency_ms.p99` just works.
    result = {**runs[0], **result}
    if len(runs) == 2:
        result["compare"] = runs[1]
        result["ratios"] = ratios(runs[0], runs[1])
    return result


def ratios(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float | None]:
    """``second / first`` for each latency percentile (above 1: the second is slower)."""
    out: dict[str, float | None] = {}
    for metric in ("added_latency_ms", "ping_rtt_ms"):
        for key, a in first[metric].items():
            b = second[metric].get(key)
            ok = isinstance(a, float | int) and isinstance(b, float | int) and a > 0
            out[f"{metric}.{key}"] = round(b / a, 2) if ok else None
    return out


def print_report(result: dict[str, Any], console: Console) -> None:
    """The report as a table: one column per server run."""
    runs = [result, *([result["compare"]] if "compare" in result else [])]
    table = Table(title="callbrain bench", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run["target"], justify="right")
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("calls (connected)", lambda r: f"{r['calls']} ({r['connected']})"),
        ("turns (interrupted)", lambda r: f"{r['turns']} ({r['interrupted_turns']})"),
        ("added latency p50 / p95 / p99 ms", lambda r: _ms(r["added_latency_ms"])),
        ("ping RTT p50 / p99 ms", lambda r: _ms(r["ping_rtt_ms"])),
        ("missed pings", lambda r: str(r["missed_pings"])),
        ("stale frames", lambda r: str(r["stale_frames"])),
        ("incomplete turns", lambda r: str(r["incomplete_turns"])),
        ("errors", lambda r: str(r["errors"])),
        ("server CPU s", lambda r: str(r.get("server_cpu_s", "-"))),
        ("server CPU ms per turn", lambda r: str(r.get("server_cpu_ms_per_turn", "-"))),
        ("server peak RSS MB", lambda r: str(r.get("server_peak_rss_mb", "-"))),
        ("bench loop lag p99 ms", lambda r: _ms(r["client_loop_lag_ms"], ("p99",))),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(run) for run in runs))
    console.print(table)
    for run in runs:
        for sample in run["error_samples"]:
            console.print(Text("error ", style="red") + Text(sample), highlight=False)
        if run["errors"] > len(run["error_samples"]):
            console.print(f"... {run['errors']} errors in all", highlight=False)
    if "ratios" in result:
        shown = ", ".join(f"{k} x{v}" for k, v in result["ratios"].items() if v is not None)
        console.print(f"second / first: {shown}", highlight=False)


def _ms(values: dict[str, float | None], keys: tuple[str, ...] | None = None) -> str:
    chosen = [values[k] for k in (keys or tuple(values))]
    return " / ".join("-" if v is None else f"{v:.1f}" for v in chosen)
