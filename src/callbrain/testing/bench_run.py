"""``callbrain bench``: start what the load needs, run it, report.

Without a URL the bench starts two processes of its own: ``callbrain fake-llm``
(the model, with a fixed time to first token and token rate) and ``callbrain
serve`` on an agent pointed at it. They are separate processes so that the
server gets a core of its own, as it would in production, and so its CPU time
is its own.

``--compare`` runs the same load against a second server: a URL (anyone's,
pointed at the same fake with ``--fake-llm-port``), or ``baseline``, which the
bench starts itself: ``benchmarks/baseline/server.py``, a minimal FastAPI and
``openai`` server written the way Retell's official demo is, on the same fake
model. For the comparison to be fair:

* both servers get the same load, call for call: the same options and the same
  seed (one is drawn for both when none is given);
* they run one after the other, never at once; each server process lives only
  for its own run, so the first is gone before the second starts;
* every server the bench started is measured the same way (psutil on its
  process: CPU seconds, CPU per caller turn, peak RSS);
* what else used the machine is reported per run: the fake model's CPU, the
  bench's own CPU and event-loop lag, and the CPU everything else on the
  machine used meanwhile (other people's work on a shared box), so a reader can
  tell a server's numbers from the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from callbrain.extras import missing_extra
from callbrain.server.app import DEFAULT_PREFIX
from callbrain.testing.bench import LoadOptions, LoadReport, run_load
from callbrain.testing.serve import free_port

try:
    import psutil
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("testing", "callbrain bench") from exc

_READY_TIMEOUT_S = 60.0
BASELINE = "baseline"
"""``--compare baseline``: the bench starts the baseline server itself."""
CALLBRAIN = "callbrain"
BASELINE_SCRIPT = Path("benchmarks") / "baseline" / "server.py"


@dataclass(frozen=True)
class FakeModel:
    """How the bench's fake model answers, and on which wire format (the served
    agent uses the provider that speaks it)."""

    ttft_s: float = 0.3
    ttft_max_s: float | None = None
    """With it, each request's first token comes after a time drawn between
    ``ttft_s`` and this (a real model's varies)."""
    token_rate: float = 50.0
    text: str = (
        "Sure, we have a few openings next week. Tuesday at ten thirty and Thursday "
        "at two are both free. Which one works better for you?"
    )
    provider: Literal["openai", "anthropic"] = "openai"


@dataclass
class RunUsage:
    """CPU seconds used during one load run, by whom; the server's peak memory."""

    server_cpu_s: float | None = None
    server_peak_rss_mb: float | None = None
    fake_llm_cpu_s: float | None = None
    bench_cpu_s: float = 0.0
    others_cpu_s: float = 0.0
    """Busy CPU time of the whole machine minus the processes above."""


def raise_open_files_limit() -> int:
    """Thousands of calls need thousands of sockets; lift the soft limit to the hard one.

    Child processes (the servers and the fake model the bench starts) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


@contextlib.asynccontextmanager
async def child(argv: list[str], port: int, name: str) -> AsyncIterator[psutil.Process]:
    """Run ``argv`` until the block ends; ready once ``port`` accepts."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process
    proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT)
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


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _machine_busy_s() -> float:
    """CPU seconds all processes have used since boot, on every core (guest time is
    inside user). Interrupt time is left out: on loopback it is mostly our own
    traffic's, and would be blamed on others."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


@contextlib.asynccontextmanager
async def measured(
    server: psutil.Process | None, fake: psutil.Process | None
) -> AsyncIterator[RunUsage]:
    """Who used how much CPU inside the block, and the server's peak RSS. A
    server of several workers counts its workers too (CPU and memory summed)."""
    usage = RunUsage()
    bench = psutil.Process()
    servers = [] if server is None else [server, *_children(server)]
    watched = [p for p in (*servers, fake, bench) if p is not None]
    before = {p.pid: _cpu_s(p) for p in watched}
    machine_before = _machine_busy_s()

    def sample_rss() -> None:
        with contextlib.suppress(psutil.Error):
            rss = sum(p.memory_info().rss for p in servers) / 2**20
            usage.server_peak_rss_mb = max(usage.server_peak_rss_mb or 0.0, rss)

    async def sample_memory() -> None:
        while True:
            sample_rss()
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_memory()) if servers else None
    try:
        yield usage
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        used: dict[int, float] = {}
        for p in watched:
            with contextlib.suppress(psutil.Error):
                used[p.pid] = _cpu_s(p) - before[p.pid]
        if servers:
            sample_rss()
            usage.server_cpu_s = sum(used.get(p.pid, 0.0) for p in servers)
        if fake is not None:
            usage.fake_llm_cpu_s = used.get(fake.pid)
        usage.bench_cpu_s = used.get(bench.pid, 0.0)
        usage.others_cpu_s = max(0.0, _machine_busy_s() - machine_before - sum(used.values()))


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


def bench_agent(
    llm_url: str, provider: str = "openai", records: str | None = None, speculation: bool = False
) -> dict[str, Any]:
    """The agent the bench serves: a short greeting, no tools, the fake model;
    its call records in the SQLite file ``records`` (None: recording off)."""
    return {
        "speculation": {"enabled": speculation},
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


def _callbrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "callbrain", *args]


@contextlib.asynccontextmanager
async def fake_model(model: FakeModel, port: int) -> AsyncIterator[psutil.Process]:
    args = ["fake-llm", "--provider", model.provider, "--port", str(port)]
    args += ["--ttft", str(model.ttft_s)]
    if model.ttft_max_s is not None:
        args += ["--ttft-max", str(model.ttft_max_s), "--seed", "1"]
    args += ["--token-rate", str(model.token_rate), "--text", model.text, "--log-level", "warning"]
    async with child(_callbrain(*args), port, "callbrain fake-llm") as process:
        yield process


@contextlib.asynccontextmanager
async def callbrain_server(
    llm_url: str,
    provider: str = "openai",
    *,
    records: bool = True,
    speculation: bool = False,
    workers: int = 1,
) -> AsyncIterator[tuple[str, psutil.Process]]:
    """``callbrain serve`` on the bench agent; yields its Retell URL and its process.
    Its call records (on by default, as in production) go to a file of its own;
    with several ``workers``, so does their shared store."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        agent = Path(folder) / "bench-agent.yaml"
        database = str(Path(folder) / "bench-calls.db") if records else None
        spec = bench_agent(llm_url, provider, database, speculation)
        if workers > 1:
            spec["server"]["store"] = {"path": str(Path(folder) / "bench-store.db")}
        agent.write_text(yaml.safe_dump(spec), encoding="utf-8")
        args = ["serve", "--agent", str(agent), "--port", str(port), "--log-level", "warning"]
        args += ["--workers", str(workers)]
        async with child(_callbrain(*args), port, "callbrain serve") as process:
            yield f"ws://127.0.0.1:{port}{DEFAULT_PREFIX}", process


def baseline_script() -> Path:
    """``benchmarks/baseline/server.py`` of the source tree callbrain runs from, or
    of the current directory; it is not part of the installed package."""
    here = Path(__file__).resolve().parents[3]
    for root in (here, Path.cwd()):
        if (root / BASELINE_SCRIPT).is_file():
            return root / BASELINE_SCRIPT
    raise RuntimeError(
        f"--compare baseline runs {BASELINE_SCRIPT} from callbrain's source tree, which is "
        f"not under {here} nor the current directory: run it from a clone of the repository"
    )


@contextlib.asynccontextmanager
async def baseline_server(llm_url: str) -> AsyncIterator[tuple[str, psutil.Process]]:
    """The baseline server on the fake model; yields its Retell URL and its process."""
    script = baseline_script()
    if importlib.util.find_spec("fastapi") is None:
        raise missing_extra("dev", "callbrain bench --compare baseline")
    port = free_port()
    argv = [sys.executable, str(script), "--port", str(port), "--openai-base-url", llm_url]
    async with child([*argv, "--api-key", "bench", "--model", "bench"], port, "baseline") as p:
        yield f"ws://127.0.0.1:{port}/llm-websocket", p


async def bench_one(
    target: str,
    options: LoadOptions,
    server: psutil.Process | None,
    fake: psutil.Process | None,
    *,
    label: str,
) -> dict[str, Any]:
    """One load run against ``target``; the server's usage when we know its process."""
    async with measured(server, fake) as usage:
        report: LoadReport = await run_load(target, options)
    result: dict[str, Any] = {"server": label, "target": target, **report.to_json()}
    if usage.server_cpu_s is not None:
        result["server_cpu_s"] = round(usage.server_cpu_s, 2)
        per_turn = usage.server_cpu_s * 1000 / report.turns if report.turns else None
        result["server_cpu_ms_per_turn"] = None if per_turn is None else round(per_turn, 2)
        result["server_peak_rss_mb"] = round(usage.server_peak_rss_mb or 0.0, 1)
    if usage.fake_llm_cpu_s is not None:
        result["fake_llm_cpu_s"] = round(usage.fake_llm_cpu_s, 2)
    result["bench_cpu_s"] = round(usage.bench_cpu_s, 2)
    result["others_cpu_s"] = round(usage.others_cpu_s, 2)
    return result


async def _run_against(
    target: str | None,
    options: LoadOptions,
    llm_url: str | None,
    fake: psutil.Process | None,
    model: FakeModel,
    records: bool,
    speculation: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Start the server ``target`` names (None: callbrain), load it, stop it."""
    if target is None:
        assert llm_url is not None
        started = callbrain_server(
            llm_url, model.provider, records=records, speculation=speculation, workers=workers
        )
        async with started as (url, server):
            result = await bench_one(url, options, server, fake, label=CALLBRAIN)
            if speculation:
                result["speculation"] = await asyncio.to_thread(speculation_counts, url)
            return result
    if target == BASELINE:
        assert llm_url is not None
        async with baseline_server(llm_url) as (url, server):
            return await bench_one(url, options, server, fake, label=BASELINE)
    return await bench_one(target, options, None, fake, label=target)


def speculation_counts(url: str) -> dict[str, float]:
    """What speculative generation did during a run, from the server's ``/metrics``:
    answers used (hits) and dropped (misses), model requests started early, and
    the output chunks dropped."""
    from prometheus_client.parser import text_string_to_metric_families

    base = "http" + url.removeprefix("ws").split("/llm-websocket")[0]
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {"hits": 0.0, "misses": 0.0, "requests": 0.0, "wasted_chunks": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "callbrain_speculations_total":
                key = "hits" if sample.labels.get("outcome") == "hit" else "misses"
                counts[key] += sample.value
            elif sample.name == "callbrain_speculative_requests_total":
                counts["requests"] += sample.value
            elif sample.name == "callbrain_speculation_wasted_chunks_total":
                counts["wasted_chunks"] += sample.value
    return counts


async def run_bench(
    url: str | None,
    options: LoadOptions,
    model: FakeModel,
    *,
    compare: str | None = None,
    fake_llm_port: int | None = None,
    compare_first: bool = False,
    records: bool = True,
    speculation: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """The whole ``callbrain bench`` run: the report as the JSON it prints.

    ``compare_first`` runs the compared server before the main one (the report
    keeps the main one on top), so repeated runs can alternate the order.
    ``records`` and ``speculation``: the callbrain started here records its calls,
    and starts answers from ``update_only``; ``workers``: its worker processes.
    """
    if compare == BASELINE and model.provider != "openai":
        raise RuntimeError("the baseline server speaks OpenAI's API only: --provider openai")
    limit = raise_open_files_limit()
    if options.seed is None:  # both servers must get the same calls
        options = replace(options, seed=random.randrange(2**31))
    result: dict[str, Any] = {
        "options": {**asdict(options), "ramp_s": options.ramp},
        "fake_llm": asdict(model),
        "open_files_limit": limit,
        "cores": os.cpu_count(),
    }
    if url is None:
        result["records"] = records
        result["workers"] = workers
    async with contextlib.AsyncExitStack() as stack:
        fake = None
        llm_url = None
        if url is None or fake_llm_port is not None or compare == BASELINE:
            port = fake_llm_port or free_port()
            fake = await stack.enter_async_context(fake_model(model, port))
            # The OpenAI SDK wants /v1 in its base URL; Anthropic's adds it itself.
            suffix = "/v1" if model.provider == "openai" else ""
            llm_url = result["fake_llm"]["url"] = f"http://127.0.0.1:{port}{suffix}"
        targets = [url, *([compare] if compare is not None else [])]
        order = list(range(len(targets)))[:: -1 if compare_first else 1]
        done: dict[int, dict[str, Any]] = {}
        for i in order:
            done[i] = await _run_against(
                targets[i], options, llm_url, fake, model, records, speculation, workers
            )
        runs = [done[i] for i in range(len(targets))]
        result["order"] = [done[i]["server"] for i in order]
    if fake is not None:
        result["fake_llm"]["cpu_s"] = round(sum(r["fake_llm_cpu_s"] for r in runs), 2)
    # The main run's numbers at the top, so `jq .added_latency_ms.p99` just works.
    result = {**runs[0], **result}
    if len(runs) == 2:
        result["compare"] = runs[1]
        result["ratios"] = ratios(runs[0], runs[1])
    return result


def ratios(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float | None]:
    """``second / first`` for each latency percentile and the CPU per turn (above 1:
    the second is slower, or costlier)."""
    pairs: list[tuple[str, Any, Any]] = []
    for metric in ("added_latency_ms", "ping_rtt_ms"):
        for key, a in first[metric].items():
            pairs.append((f"{metric}.{key}", a, second[metric].get(key)))
    if "server_cpu_ms_per_turn" in first and "server_cpu_ms_per_turn" in second:
        cpu = "server_cpu_ms_per_turn"
        pairs.append((cpu, first[cpu], second[cpu]))
    out: dict[str, float | None] = {}
    for name, a, b in pairs:
        ok = isinstance(a, float | int) and isinstance(b, float | int) and a > 0
        out[name] = round(b / a, 2) if ok else None
    return out
