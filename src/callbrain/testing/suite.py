"""``callbrain test``: run scenario files against a server and report.

Against a URL, the scenarios talk to whatever server is there (ours or anyone's
that speaks Retell's protocol). Without one, the agent file is served in this
process; a scenario with a ``script`` then gets a fake model that answers
with it, so its tools and flow are tested without a model's variance.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from callbrain.agent import Agent
from callbrain.call.speculation import SpeculationSettings
from callbrain.llm.config import OpenAIConfig
from callbrain.testing.agent_server import serve_agent
from callbrain.testing.client import RetellClient
from callbrain.testing.fake_llm import FakeOpenAIServer, Reply
from callbrain.testing.scenario import Scenario, load_scenario
from callbrain.testing.scenario_run import ScenarioResult, ScenarioRunner, judge

logger = logging.getLogger("callbrain.testing")

_SCRIPT_EXHAUSTED = "(The scenario's script has no more replies.)"


async def run_scenario(scenario: Scenario, url: str, path: str = "") -> ScenarioResult:
    """Play ``scenario`` as one call against the server at ``url`` (Retell's base URL)."""
    result = ScenarioResult(scenario.name, path)
    started = time.monotonic()
    try:
        async with RetellClient.connect(url, scenario.call_id) as call:
            runner = ScenarioRunner(scenario, call)
            try:
                await runner.run(result)
            except ConnectionClosed:
                result.failures.append(
                    f"the server closed the socket (code {call.close_code}) mid-scenario"
                )
            judge(runner, result)
            if runner.ended and not any("not run" in f for f in result.failures):
                result.notes.append(runner.ended)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        result.failures.append(f"could not connect to {url}: {exc}")
    result.duration_s = time.monotonic() - started
    return result


@contextlib.asynccontextmanager
async def _serve(agent: Agent, scenario: Scenario) -> AsyncIterator[str]:
    """The agent on a loopback port; on a fake model when the scenario is scripted."""
    if scenario.script is None:
        async with serve_agent(agent) as url:
            yield url
        return
    replies = [reply.to_reply() for reply in scenario.script]
    async with FakeOpenAIServer(*replies, default=Reply(_SCRIPT_EXHAUSTED)) as fake:
        llm = OpenAIConfig(
            provider="openai", model="scripted", base_url=fake.base_url, api_key="scripted"
        )
        # The script answers the turns' requests in order; a speculative request
        # that misses (the caller's first sentence of several) would eat a reply.
        off = SpeculationSettings(enabled=False)
        async with serve_agent(agent.model_copy(update={"llm": llm, "speculation": off})) as url:
            yield url


async def run_suite(
    paths: list[Path], *, url: str | None = None, agent: Agent | None = None
) -> list[ScenarioResult]:
    """Every scenario file in turn, against ``url`` or against ``agent`` served here."""
    if (url is None) == (agent is None):
        raise ValueError("give either a URL or an agent")
    results: list[ScenarioResult] = []
    for path in paths:
        scenario = load_scenario(path)
        if url is not None:
            result = await run_scenario(scenario, url, str(path))
            if scenario.script is not None:
                result.notes.append("script ignored: the server's own model answered")
        else:
            assert agent is not None
            async with _serve(agent, scenario) as served:
                result = await run_scenario(scenario, served, str(path))
        results.append(result)
    return results


def report_table(results: list[ScenarioResult], console: Console) -> None:
    """The human report: one row per scenario, then what went wrong."""
    table = Table(title="callbrain scenarios", title_justify="left")
    table.add_column("scenario")
    table.add_column("result")
    table.add_column("turns", justify="right")
    table.add_column("first chunk ms\np50 / max", justify="right")
    table.add_column("first sentence ms\np50 / max", justify="right")
    table.add_column("s", justify="right")
    for r in results:
        table.add_row(
            r.name,
            "[green]pass[/green]" if r.passed else "[red]FAIL[/red]",
            str(sum(1 for t in r.turns if t.kind != "greeting")),
            _pair(r.timing("first_chunk_ms")),
            _pair(r.timing("first_sentence_ms")),
            f"{r.duration_s:.1f}",
        )
    console.print(table)
    for r in results:
        problems = [*(f"protocol: {v}" for v in r.violations), *r.failures]
        if problems:
            console.print(f"[red]✗ {r.name}[/red] ({r.path})", highlight=False)
            for problem in problems:
                console.print(f"    {problem}", highlight=False, markup=False)
        for note in r.notes:
            console.print(f"[dim]  {r.name}: {note}[/dim]", highlight=False)
    failed = sum(1 for r in results if not r.passed)
    summary = f"{len(results) - failed} passed, {failed} failed"
    console.print(f"[{'red' if failed else 'green'}]{summary}[/]")


def report_json(results: list[ScenarioResult]) -> dict[str, Any]:
    return {
        "passed": all(r.passed for r in results),
        "scenarios": [r.to_json() for r in results],
    }


def _pair(values: tuple[float | None, float | None]) -> str:
    p50, worst = values
    if p50 is None or worst is None:
        return "-"
    return f"{p50:.0f} / {worst:.0f}"
