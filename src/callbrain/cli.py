"""The ``callbrain`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from callbrain import __version__
from callbrain.agent import Agent, AgentConfigError, example_agent_path
from callbrain.logs import configure_logging
from callbrain.server import DEFAULT_PREFIX, create_app

app = typer.Typer(
    help="callbrain: the brain behind Retell voice agents (Custom LLM WebSocket server).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"callbrain {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """callbrain: the brain behind Retell voice agents."""


@app.command()
def serve(
    agent: Annotated[
        Path | None,
        typer.Option("--agent", "-a", help="Agent YAML file. Default: the shipped clinic example."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    prefix: Annotated[str, typer.Option(help="WebSocket route prefix.")] = DEFAULT_PREFIX,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Run the Retell Custom LLM WebSocket server for one agent."""
    configure_logging(log_level, json=log_json)
    path = agent or example_agent_path()
    try:
        definition = Agent.from_yaml(path)
        # Built now so a tool that does not import fails here, not on a call.
        application = create_app(definition, prefix=prefix)
    except AgentConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    route = "/" + prefix.strip("/") if prefix.strip("/") else ""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    llm = definition.llm
    model = (
        getattr(llm, "model", None) or getattr(llm, "model_path", None) or "SmolLM2-135M (shipped)"
    )
    console.print(
        f"[bold]callbrain[/bold] agent [cyan]{definition.name}[/cyan] "
        f"({llm.provider}: {model}) from {path}\n"
        f"  WebSocket   ws://{shown_host}:{port}{route}/{{call_id}}\n"
        f"  Health      http://{shown_host}:{port}/healthz\n"
        f"  In Retell (agent > Custom LLM URL) paste: [green]wss://<your-public-host>{route}[/green]\n"
        f"  Retell appends /{{call_id}} itself; terminate TLS at a proxy or tunnel.",
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_config=None,
        ws="websockets-sansio",
        lifespan="on",
    )


@app.command()
def example() -> None:
    """Print the shipped example agent file, to start your own: callbrain example > my.yaml"""
    typer.echo(example_agent_path().read_text(encoding="utf-8"), nl=False)
