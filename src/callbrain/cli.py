"""The ``callbrain`` command."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from callbrain import __version__
from callbrain.agent import Agent, example_agent_path
from callbrain.errors import AgentConfigError
from callbrain.extras import MissingExtraError
from callbrain.logs import configure_logging
from callbrain.records.cli import calls_app
from callbrain.server.app import DEFAULT_PREFIX, create_app
from callbrain.server.process import CallbrainServer, raise_open_file_limit, uvicorn_config
from callbrain.testing.chat_terminal import chat_command
from callbrain.testing.fake_llm.command import fake_llm

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
    except (AgentConfigError, MissingExtraError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    route = "/" + prefix.strip("/") if prefix.strip("/") else ""
    # A placeholder: the secret itself never goes to the terminal (or its scrollback).
    secret = "/<secret>" if definition.server.access.secret is not None else ""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    llm = definition.llm
    model = (
        getattr(llm, "model", None) or getattr(llm, "model_path", None) or "SmolLM2-135M (shipped)"
    )
    console.print(
        f"[bold]callbrain[/bold] agent [cyan]{definition.name}[/cyan] "
        f"({llm.provider}: {model}) from {path}\n"
        f"  WebSocket   ws://{shown_host}:{port}{route}{secret}/{{call_id}}\n"
        f"  Health      http://{shown_host}:{port}/healthz\n"
        + (
            f"  Console     http://{shown_host}:{port}/console/\n"
            if application.state.console
            else ""
        )
        + f"  In Retell (agent > Custom LLM URL) paste: [green]wss://<your-public-host>{route}{secret}[/green]\n"
        f"  Retell appends /{{call_id}} itself; terminate TLS at a proxy or tunnel.",
        highlight=False,
        soft_wrap=True,
    )
    # The ~200,000 objects imports create live as long as the process; a full
    # garbage collection walked them all, pausing every call for ~100 ms (the p99
    # of `callbrain bench`). Frozen, they are never walked again.
    gc.collect()
    gc.freeze()
    settings = definition.server
    # Before the config: the share of descriptors half-open connections may take
    # is worked out from the limit.
    raise_open_file_limit(settings.access.max_pending_handshakes)
    config = uvicorn_config(application, host=host, port=port, settings=settings)
    server = CallbrainServer(
        config,
        application.state.runtime,
        drain_s=settings.drain_s,
        finish_turn_s=settings.finish_turn_s,
    )
    server.run()


@app.command("test")
def test_scenarios(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Scenario files or directories. Default: the shipped examples."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Test the server at this WebSocket URL (as configured in Retell)."),
    ] = None,
    agent: Annotated[
        Path | None,
        typer.Option("--agent", "-a", help="Serve this agent file here. Default: the example."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON ('-': stdout).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="The served agent's log level.")] = "warning",
) -> None:
    """Run scenario files (simulated calls) and check every frame against the protocol."""
    from callbrain.testing.scenario import ScenarioError, example_scenarios_path, find_scenarios
    from callbrain.testing.suite import report_json, report_table, run_suite

    configure_logging(log_level)
    if url is not None and agent is not None:
        _fail("give --url or --agent, not both")
    try:
        files = find_scenarios(paths or [example_scenarios_path()])
        definition = None if url else Agent.from_yaml(agent or example_agent_path())
        if definition is not None:
            definition.build_tools()  # fail here, once, not in every scenario
        results = asyncio.run(run_suite(files, url=_ws_url(url), agent=definition))
    except (ScenarioError, AgentConfigError) as exc:
        _fail(str(exc))
    if json_path is not None:
        text = orjson.dumps(report_json(results), option=orjson.OPT_INDENT_2).decode()
        if str(json_path) == "-":
            typer.echo(text)
        else:
            json_path.write_text(text + "\n", encoding="utf-8")
    report_table(results, console if str(json_path) == "-" else Console())
    if not all(result.passed for result in results):
        raise typer.Exit(1)


@app.command()
def bench(
    url: Annotated[
        str | None,
        typer.Argument(help="A server to load (its Retell URL). Default: start callbrain here."),
    ] = None,
    calls: Annotated[int, typer.Option(min=1, help="Concurrent calls.")] = 100,
    duration: Annotated[
        float, typer.Option(min=1, help="Seconds every call keeps talking after the ramp-up.")
    ] = 30.0,
    ramp: Annotated[
        float | None, typer.Option(min=0, help="Seconds to connect all calls. Default: 200/s.")
    ] = None,
    pause: Annotated[
        float,
        typer.Option(min=0, help="Mean seconds from the end of a reply to the caller's next turn."),
    ] = 8.0,
    interrupt_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of replies the caller barges in on.")
    ] = 0.2,
    ttft: Annotated[
        float, typer.Option(min=0, help="The fake model's seconds to first token.")
    ] = 0.3,
    token_rate: Annotated[
        float, typer.Option(min=1, help="The fake model's tokens per second.")
    ] = 50.0,
    provider: Annotated[
        Literal["openai", "anthropic"],
        typer.Option(help="The fake model's API, and so the backend the served agent uses."),
    ] = "openai",
    compare: Annotated[
        str | None,
        typer.Option(help="Run the same load against this second server and print ratios."),
    ] = None,
    fake_llm_port: Annotated[
        int | None,
        typer.Option(help="Start the fake model on this port (for servers you point at it)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here ('-': stdout).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for repeatable call scripts.")] = None,
    records: Annotated[
        bool,
        typer.Option(
            "--records/--no-records",
            help="Whether the server started here records its calls (to a file of its own).",
        ),
    ] = True,
) -> None:
    """Load a server with simulated calls; report added latency, pings and protocol errors."""
    from callbrain.testing.bench import LoadOptions
    from callbrain.testing.bench_run import FakeModel, print_report, run_bench

    options = LoadOptions(
        calls=calls,
        duration_s=duration,
        ramp_s=ramp,
        pause_s=pause,
        interrupt_rate=interrupt_rate,
        ttft_s=ttft,
        seed=seed,
    )
    model = FakeModel(ttft_s=ttft, token_rate=token_rate, provider=provider)
    here = f"callbrain serve (started here, records {'on' if records else 'off'})"
    console.print(
        f"bench: {calls} calls for {options.ramp + duration:.0f} s against "
        f"{url or here}" + (f", then {compare}" if compare else ""),
        highlight=False,
    )
    bench_run = run_bench(
        _ws_url(url),
        options,
        model,
        compare=_ws_url(compare),
        fake_llm_port=fake_llm_port,
        records=records,
    )
    try:
        # uvloop (installed with uvicorn[standard]) halves the simulated callers' own
        # CPU, which shares the machine with the server being measured.
        with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
            result = runner.run(bench_run)
    except RuntimeError as exc:
        _fail(str(exc))
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if json_path is not None and str(json_path) == "-":
        typer.echo(text)
    elif json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
    print_report(result, console if json_path is not None and str(json_path) == "-" else Console())


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _ws_url(url: str | None) -> str | None:
    from callbrain.testing.client import websocket_url

    try:
        return None if url is None else websocket_url(url)
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def example() -> None:
    """Print the shipped example agent file, to start your own: callbrain example > my.yaml"""
    typer.echo(example_agent_path().read_text(encoding="utf-8"), nl=False)


app.command("fake-llm")(fake_llm)
app.command("chat")(chat_command)
app.add_typer(calls_app, name="calls")
