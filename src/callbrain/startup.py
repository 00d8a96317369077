"""What the commands share before anything runs: loading agent files, one line
per error, and the banner of ``callbrain serve``.

Whoever starts callbrain with a mistake in a file, a missing key or a port in
use wants one line naming the file, the key and what to do, not a traceback:
:func:`reporting` turns the errors written for people
(:class:`~callbrain.errors.AgentConfigError`,
:class:`~callbrain.errors.StartupError`,
:class:`~callbrain.extras.MissingExtraError`, a bad scenario file) into
``error: ...`` lines on stderr and exit status 2. Anything else is a bug: one
line too, exit status 1, and ``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from callbrain.agent import Agent
from callbrain.errors import AgentConfigError, StartupError
from callbrain.extras import MissingExtraError
from callbrain.llm.config import LLMConfig
from callbrain.server.app import retell_path
from callbrain.server.settings import ServerSettings

EXIT_CONFIG = 2
"""A configuration or start-up error: fix a file, a key, a flag."""
EXIT_BUG = 1

AGENT_SUFFIXES = (".yaml", ".yml")
SHIPPED_MODEL = "SmolLM2-135M (shipped)"

console = Console(stderr=True)
logger = logging.getLogger("callbrain.serve")


class UsageError(Exception):
    """A command line that cannot work (``--agent`` with a URL, say): exit 2."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors written for people, each printed as it is."""
    from callbrain.testing.scenario import ScenarioError

    return (AgentConfigError, StartupError, MissingExtraError, ScenarioError, UsageError)


def fail(message: str, code: int = EXIT_CONFIG) -> typer.Exit:
    """Print ``message`` as ``error:`` lines on stderr; returns the Exit to raise."""
    for line in message.splitlines() or [""]:
        console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def reporting(debug: bool = False) -> Iterator[None]:
    """Errors raised in the block as one line each and an exit status (see the
    module docstring); with ``debug``, the traceback first."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except user_errors() as exc:
        if debug:
            traceback.print_exc()
        raise fail(str(exc)) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        raise fail(f"unexpected {type(exc).__name__}: {exc}{hint}", EXIT_BUG) from None


def load_agents(paths: Sequence[Path]) -> list[Agent]:
    """The agents in ``paths``: agent files, or folders whose ``*.yaml`` /
    ``*.yml`` files are all agent files (in name order)."""
    agents: list[Agent] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in AGENT_SUFFIXES)
            if not files:
                raise AgentConfigError(f"{path}: no agent files (*.yaml, *.yml) in this folder")
            agents += [Agent.from_yaml(file) for file in files]
        else:
            agents.append(Agent.from_yaml(path))
    return agents


def model_label(llm: LLMConfig) -> str:
    """``openai: gpt-4o-mini``: the provider and model, as people name them."""
    model = getattr(llm, "model", None) or getattr(llm, "model_path", None) or SHIPPED_MODEL
    return f"{llm.provider}: {model}"


def announce(
    agents: Sequence[Agent],
    settings: ServerSettings,
    *,
    host: str,
    port: int,
    prefix: str,
    json: bool,
    workers: str | None = None,
) -> None:
    """The banner of ``callbrain serve``: for each agent, the URL to paste into
    Retell; then health and metrics (and ``workers``, what serves the port when
    several processes do). As log lines with ``--log-json`` (a log pipeline
    wants nothing else on stderr), else as text."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"{shown}:{port}" if ":" not in shown else f"[{shown}]:{port}"
    secret = settings.access.secret is not None  # only a placeholder is ever shown
    one = len(agents) == 1
    entries = [
        (
            agent,
            retell_path(prefix, None if one else agent.name, secret=False),
            retell_path(prefix, None if one else agent.name, secret=secret),
        )
        for agent in agents
    ]
    extra = [("Health", f"http://{base}/healthz")]
    if settings.metrics.enabled:
        extra.append(("Metrics", f"http://{base}/metrics"))
    if settings.console:
        extra.append(("Console", f"http://{base}/console/"))
    if workers is not None:
        extra.append(("Workers", workers))
    if json:
        for agent, path, pasted in entries:
            logger.info(
                "serving agent %r (%s) from %s: socket ws://%s%s/{call_id}; Retell URL "
                "wss://<your-public-host>%s",
                agent.name, model_label(agent.llm), agent.source, base, path, pasted,
            )  # fmt: skip
        for name, url in extra:
            logger.info("%s: %s", name.lower(), url)
        return
    lines: list[str] = []
    for agent, path, pasted in entries:
        indent = "  " if one else "    "
        head = "[bold]callbrain[/bold] agent" if one else " "
        lines += [
            f"{head} [cyan]{escape(agent.name)}[/cyan] ({escape(model_label(agent.llm))}) "
            f"from {escape(agent.source)}",
            f"{indent}WebSocket   ws://{base}{escape(path)}/{{call_id}}",
        ]
        if not one:
            lines.append(f"{indent}In Retell   [green]wss://<your-public-host>{pasted}[/green]")
    if not one:
        lines.insert(0, f"[bold]callbrain[/bold] {len(agents)} agents")
    lines += [f"  {name:<11} {url}" for name, url in extra]
    if one:
        lines.append(
            "  In Retell (agent > Custom LLM URL) paste: "
            f"[green]wss://<your-public-host>{entries[0][2]}[/green]"
        )
    else:
        lines.append("  In Retell, paste each agent's URL as its Custom LLM URL.")
    lines.append("  Retell appends /{call_id} itself; terminate TLS at a proxy or tunnel.")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
