"""The ``callbrain`` command."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import orjson
import typer
from rich.console import Console

from callbrain import __version__
from callbrain.agent import Agent, example_agent_path
from callbrain.extras import MissingExtraError
from callbrain.logs import LogLevel, configure_logging
from callbrain.records.cli import calls_app
from callbrain.server.app import DEFAULT_PREFIX, create_app, server_settings
from callbrain.server.process import listening_socket, serve_when_ready
from callbrain.server.worker import WorkerSpec
from callbrain.server.workers import serve_workers, worker_count
from callbrain.startup import UsageError, announce, fail, load_agents, reporting
from callbrain.testing.chat_terminal import chat_command
from callbrain.testing.fake_llm.command import fake_llm

app = typer.Typer(
    help="callbrain: the brain behind Retell voice agents (Custom LLM WebSocket server).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

LOG_LEVEL_OPTION = typer.Option(case_sensitive=False, help="How much to log.")


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


DEBUG_OPTION = typer.Option("--debug", help="Show the traceback of a start-up error.")


@app.command()
def serve(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="AGENT",
            help="Agent files, or folders of them (every *.yaml). Default: the shipped example.",
            show_default=False,
        ),
    ] = None,
    agent: Annotated[
        list[Path] | None,
        typer.Option("--agent", "-a", help="An agent file (repeatable; same as the arguments)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8080,
    prefix: Annotated[str, typer.Option(help="WebSocket route prefix.")] = DEFAULT_PREFIX,
    log_level: Annotated[LogLevel, LOG_LEVEL_OPTION] = "info",
    log_json: Annotated[
        bool,
        typer.Option("--log-json", help="One JSON object per log line (the banner too)."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="CALLBRAIN_WORKERS",
            help="Processes serving calls on the port. Default: server.workers, else one per "
            "core (one for a local model or the console).",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[bool, DEBUG_OPTION] = False,
) -> None:
    """Run the Retell Custom LLM WebSocket server for one agent or several."""
    configure_logging(log_level, json=log_json)
    with reporting(debug):
        paths = [*(files or []), *(agent or [])] or [example_agent_path()]
        agents = load_agents(paths)
        count, note = worker_count(workers, agents, server_settings(agents))
        if count > 1:
            spec = WorkerSpec(
                index=0,
                files=[str(path) for path in paths],
                prefix=prefix,
                host=host,
                log_level=log_level,
                log_json=log_json,
                debug=debug,
                listen_fd=-1,
                link_fd=-1,
                store_path=None,
            )
            raise typer.Exit(serve_workers(agents, spec, count, port=port, note=note))
        # Built now so a tool that does not import, a missing key or model file fail
        # here, not on a call; the socket is bound before anything is announced.
        application = create_app(agents, prefix=prefix)
        settings = server_settings(agents)
        sock = listening_socket(host, port)

        def ready() -> None:
            bound = int(sock.getsockname()[1])
            announce(agents, settings, host=host, port=bound, prefix=prefix, json=log_json)
            # The ~200,000 objects imports create live as long as the process; a full
            # garbage collection walked them all, pausing every call for ~100 ms (the
            # p99 of `callbrain bench`). Frozen, they are never walked again.
            gc.collect()
            gc.freeze()
            if note is not None:
                logging.getLogger("callbrain.serve").info("%s", note)

        # The store and the models start first: a failure is one line, not a banner.
        serve_when_ready(application, sock, host=host, settings=settings, ready=ready)


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
    log_level: Annotated[LogLevel, LOG_LEVEL_OPTION] = "warning",
    debug: Annotated[bool, DEBUG_OPTION] = False,
) -> None:
    """Run scenario files (simulated calls) and check every frame against the protocol."""
    from callbrain.testing.scenario import example_scenarios_path, find_scenarios
    from callbrain.testing.suite import report_json, report_table, run_suite

    configure_logging(log_level)
    with reporting(debug):
        if url is not None and agent is not None:
            raise UsageError("give --url or --agent, not both")
        files = find_scenarios(paths or [example_scenarios_path()])
        definition = None if url else Agent.from_yaml(agent or example_agent_path())
        if definition is not None:
            definition.build_tools()  # fail here, once, not in every scenario
        results = asyncio.run(run_suite(files, url=_ws_url(url), agent=definition))
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
def check(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="AGENT",
            help="Agent files, or folders of them. Default: the shipped example.",
            show_default=False,
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live", help="Also send one tiny request to each model, and ping a Redis store."
        ),
    ] = False,
    debug: Annotated[bool, DEBUG_OPTION] = False,
) -> None:
    """Check agent files before a deploy: keys, tools, models, extras; exit 0 or 2."""
    from callbrain.check import run_check

    configure_logging("warning")
    with reporting(debug):
        code = run_check(files or [example_agent_path()], live=live, console=Console())
    raise typer.Exit(code)


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
    ttft_max: Annotated[
        float | None,
        typer.Option(min=0, help="Draw the first token's time between --ttft and this."),
    ] = None,
    final_update_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="The caller's finished words arrive in an update_only this long before "
            "each request, as Retell sends them. 0: together.",
        ),
    ] = 0.0,
    speculation: Annotated[
        bool,
        typer.Option(
            "--speculation/--no-speculation",
            help="Whether the server started here starts answers from update_only.",
        ),
    ] = False,
    token_rate: Annotated[
        float, typer.Option(min=1, help="The fake model's tokens per second.")
    ] = 50.0,
    provider: Annotated[
        Literal["openai", "anthropic"],
        typer.Option(help="The fake model's API, and so the backend the served agent uses."),
    ] = "openai",
    compare: Annotated[
        str | None,
        typer.Option(
            help="Then run the same load against a second server and print ratios: its URL, "
            "or 'baseline' to start benchmarks/baseline/server.py (a minimal FastAPI + openai "
            "server as in Retell's demo) on the same fake model."
        ),
    ] = None,
    curve: Annotated[
        str | None,
        typer.Option(
            help="Call counts, e.g. 100,250,500: run the whole bench at each (--calls is "
            "ignored) and write --markdown and --plot."
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --curve: runs per point, alternating which server goes first; the "
            "table shows the median one and every run's p99.",
        ),
    ] = 1,
    markdown: Annotated[
        Path, typer.Option(help="With --curve: the Markdown page the table goes in.")
    ] = Path("bench-curve.md"),
    plot: Annotated[
        Path | None,
        typer.Option(
            help="With --curve: the PNG plot (needs the 'bench' extra). "
            "Default: the Markdown page's path with .png."
        ),
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
    workers: Annotated[
        int,
        typer.Option(min=1, help="Worker processes of the server started here (serve --workers)."),
    ] = 1,
) -> None:
    """Load a server with simulated calls; report added latency, pings and protocol errors."""
    import sys

    from callbrain.testing.bench import LoadOptions
    from callbrain.testing.bench_report import print_report
    from callbrain.testing.bench_run import BASELINE, FakeModel, run_bench

    options = LoadOptions(
        calls=calls,
        duration_s=duration,
        ramp_s=ramp,
        pause_s=pause,
        interrupt_rate=interrupt_rate,
        ttft_s=ttft,
        final_update_s=final_update_ms / 1000,
        seed=seed,
    )
    model = FakeModel(ttft_s=ttft, ttft_max_s=ttft_max, token_rate=token_rate, provider=provider)
    second = compare if compare == BASELINE else _ws_url(compare)
    if curve is not None:
        from callbrain.testing.bench_curve import curve_to_files, parse_points
        from callbrain.testing.bench_plot import require_plotting

        if url is not None:
            _fail("--curve starts its servers itself: give no URL")
        if workers != 1:
            _fail("--curve measures one worker: leave out --workers")
        try:
            points = parse_points(curve)
            require_plotting()
        except (ValueError, MissingExtraError) as exc:
            _fail(str(exc))
        command = ["callbrain", *sys.argv[1:]]
        png = plot or markdown.with_suffix(".png")
        result = _run_bench_loop(
            curve_to_files(
                points, options, model, second, repeat, (markdown, png), command, console
            )
        )
    else:
        here = f"callbrain serve (started here, records {'on' if records else 'off'}" + (
            f", {workers} workers)" if workers > 1 else ")"
        )
        console.print(
            f"bench: {calls} calls for {options.ramp + duration:.0f} s against "
            f"{url or here}" + (f", then {second}" if second else ""),
            highlight=False,
        )
        result = _run_bench_loop(
            run_bench(
                _ws_url(url),
                options,
                model,
                compare=second,
                fake_llm_port=fake_llm_port,
                records=records,
                speculation=speculation,
                workers=workers,
            )
        )
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if json_path is not None and str(json_path) == "-":
        typer.echo(text)
    elif json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
    if curve is None:
        out = console if json_path is not None and str(json_path) == "-" else Console()
        print_report(result, out)


def _run_bench_loop(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run the bench on uvloop; a server that fails to start is a clean error."""
    try:
        # uvloop (installed with uvicorn[standard]) halves the simulated callers' own
        # CPU, which shares the machine with the server being measured.
        with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
            return runner.run(coroutine)
    except (RuntimeError, MissingExtraError) as exc:
        _fail(str(exc))


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _fail(message: str) -> NoReturn:
    raise fail(message)


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
