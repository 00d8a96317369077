"""``callbrain check``: will these agent files serve calls? Answered before a deploy.

Each file is checked as ``callbrain serve`` would load it, one finding a line:
the file itself, its tools (imported), each model's settings (a key or a base
URL, the model file, the extra installed: the client is built), then the
server as a whole (the ``server:`` blocks together, tracing and store extras,
the webhook handler), by building the app. Nothing is sent anywhere unless
``--live``: then each model, the primary and every fallback on its own, gets
one tiny request, whose first words and time to the first token are reported
(the stream is closed after a few words: a long answer costs nothing more),
and a Redis store is pinged. Any failure makes the status 2 and names the
file and the key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from callbrain.agent import Agent
from callbrain.errors import AgentConfigError, StartupError
from callbrain.extras import MissingExtraError
from callbrain.llm import LLM, ChatRequest, Message, TextDelta
from callbrain.llm.config import LLMConfig
from callbrain.server.app import create_app
from callbrain.server.runtime import build_llm, llm_entries
from callbrain.startup import load_agents, model_label

PING = ChatRequest(
    system="You are being health-checked. Reply with the single word: OK",
    messages=(Message("user", "Are you there?"),),
)
_SHOWN_ANSWER = 60
_FAILURES = (AgentConfigError, StartupError, MissingExtraError, ValueError, TypeError)


@dataclass(frozen=True, slots=True)
class Finding:
    source: str
    what: str
    ok: bool
    detail: str


class Checker:
    """Collects findings and prints each as it is made."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.findings: list[Finding] = []

    def report(self, source: str, what: str, ok: bool, detail: str = "") -> bool:
        finding = Finding(source, what, ok, detail)
        self.findings.append(finding)
        mark = "[green]ok  [/green]" if ok else "[red]FAIL[/red]"
        text = f"  {mark}  {escape(what)}" + (f": {escape(detail)}" if detail else "")
        self.console.print(text, highlight=False, soft_wrap=True)
        return ok

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


def run_check(paths: Sequence[Path], *, live: bool, console: Console) -> int:
    """Check the agent files (or folders of them) in ``paths``; the exit status."""
    checker = Checker(console)
    agents: list[Agent] = []
    for path in paths:
        try:
            loaded = load_agents([path])
        except AgentConfigError as exc:
            console.print(escape(str(path)), highlight=False)
            checker.report(str(path), "agent file", False, _without_source(str(exc), str(path)))
            continue
        for agent in loaded:
            console.print(escape(agent.source), highlight=False)
            checker.report(agent.source, "agent file", True, f"agent {agent.name!r}")
            if _check_agent(checker, agent):
                agents.append(agent)
    if agents and not checker.failed:
        _check_server(checker, agents)
    if live:
        for agent in agents:
            console.print(escape(agent.source) + " (live)", highlight=False)
            asyncio.run(_check_live(checker, agent))
    failed = checker.failed
    if failed:
        where = ", ".join(dict.fromkeys(f"{f.source}: {f.what}" for f in failed))
        console.print(f"[red]check failed[/red]: {escape(where)}", highlight=False, soft_wrap=True)
        return 2
    console.print("[green]check passed[/green]", highlight=False)
    return 0


def _check_agent(checker: Checker, agent: Agent) -> bool:
    ok = True
    try:
        tools = agent.build_tools()
    except AgentConfigError as exc:
        detail = _without_source(str(exc), agent.source).removeprefix("tools: ")
        ok = checker.report(agent.source, "tools", False, detail)
    else:
        names = ", ".join(tools) or "none"
        checker.report(agent.source, "tools", True, names)
    for key, config in llm_entries(agent):
        what = f"{key} ({model_label(config)})"
        try:
            llm = build_llm(key, config, agent.source)
        except AgentConfigError as exc:
            detail = _without_source(str(exc), agent.source).removeprefix(f"{key}: ")
            ok = checker.report(agent.source, what, False, detail)
        else:
            asyncio.run(llm.aclose())
            checker.report(agent.source, what, True, "settings complete")
    return ok


def _check_server(checker: Checker, agents: list[Agent]) -> None:
    """The app as ``callbrain serve`` builds it: the process-wide settings, the
    extras they need, the webhook handler."""
    source = agents[0].source
    try:
        app = create_app(agents)
    except (AgentConfigError, MissingExtraError) as exc:
        checker.report(source, "server", False, _without_source(str(exc), source))
        return
    for runtime in app.state.runtimes:
        asyncio.run(runtime.aclose())
    asyncio.run(app.state.telemetry.aclose())
    settings = agents[0].server
    store = "redis" if settings.store.redis_url else "in memory"
    webhooks = "on" if settings.webhooks.api_key is not None else "off"
    metrics = "on" if settings.metrics.enabled else "off"
    detail = f"store {store}, metrics {metrics}, webhooks {webhooks}"
    checker.report(source, "server", True, detail)


async def _check_live(checker: Checker, agent: Agent) -> None:
    for key, config in llm_entries(agent):
        await _ask(checker, agent, key, config)
    if agent.server.store.redis_url:
        from callbrain.stores import open_store

        store = open_store(agent.server.store.redis_url, prefix=agent.server.store.redis_prefix)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(agent.server.store.timeout_s):
                await store.ping()
        except Exception as exc:
            detail = f"does not answer: {type(exc).__name__}: {exc}"
            checker.report(agent.source, "server.store.redis_url", False, detail)
        else:
            detail = f"answers ({_ms(started)} ms)"
            checker.report(agent.source, "server.store.redis_url", True, detail)
        finally:
            await store.aclose()


async def _ask(checker: Checker, agent: Agent, key: str, config: LLMConfig) -> None:
    what = f"{key} ({model_label(config)})"
    try:
        llm = build_llm(key, config, agent.source)
    except AgentConfigError:
        return  # already reported, and nothing to ask
    try:
        await llm.warmup()  # a local model loads first: not the request's latency
        answer, first = await _one_answer(llm)
    except Exception as exc:
        checker.report(agent.source, what, False, f"no answer: {type(exc).__name__}: {exc}")
    else:
        shown = " ".join(answer.split())
        if len(shown) > _SHOWN_ANSWER:
            shown = shown[: _SHOWN_ANSWER - 3] + "..."
        detail = f"first token in {first} ms: {shown!r}"
        checker.report(agent.source, what, True, detail)
    finally:
        await llm.aclose()


async def _one_answer(llm: LLM) -> tuple[str, int]:
    """The start of the model's answer (enough to show; the stream is closed then,
    which stops the generation) and the milliseconds to its first text."""
    started = time.perf_counter()
    first: int | None = None
    parts: list[str] = []
    async with llm.chat(PING) as stream:
        async for chunk in stream:
            if isinstance(chunk, TextDelta) and chunk.text:
                if first is None:
                    first = _ms(started)
                parts.append(chunk.text)
                if sum(map(len, parts)) >= _SHOWN_ANSWER:
                    break
    if first is None:
        raise StartupError("the model said nothing")
    return "".join(parts), first


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _without_source(message: str, source: str) -> str:
    """A configuration error's message without the file it names (the heading says
    it), its problems on one line."""
    return "; ".join(line.removeprefix(f"{source}: ") for line in message.splitlines())
