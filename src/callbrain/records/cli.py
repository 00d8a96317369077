"""``callbrain calls``: list, show and export recorded calls, and migrate the database.

Every command reads the database the server writes: ``--db URL`` (or a SQLite
file path), or ``--agent FILE`` for that agent file's ``server.records``
setting, or else the default SQLite file. Imports stay light until a command
runs, so ``callbrain --help`` does not pay for SQLAlchemy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.text import Text

from callbrain.records.settings import database_url, settings_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")

calls_app = typer.Typer(
    help="Recorded calls: list them, show one turn by turn, export one as a test scenario.",
    no_args_is_help=True,
)
_err = Console(stderr=True)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (postgresql://..., sqlite:///...) or SQLite file."),
]
AgentFileOption = Annotated[
    Path | None,
    typer.Option("--agent", "-a", help="Use this agent file's server.records database."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@calls_app.command("list")
def list_command(
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            "-a",
            help="An agent name (only its calls), or an agent file (its database, its calls).",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many calls.")] = 20,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """The newest calls: start, duration, turns, worst first-frame latency, how each ended."""
    from callbrain.records.read import list_calls
    from callbrain.records.show import render_list

    name, agent_file = agent, None
    if agent is not None and (agent.endswith((".yaml", ".yml")) or Path(agent).is_file()):
        agent_file = Path(agent)
        name = _agent_name(agent_file)
    url = _database(db, agent_file)
    found = _read(url, lambda c: list_calls(c, agent=name, limit=limit))
    if as_json:
        _print_json(found)
    elif not found:
        shown = f"no calls recorded{f' for agent {name!r}' if name else ''} in {_shown(url)}"
        _err.print(Text(shown), highlight=False)
    else:
        render_list(found, Console())


@calls_app.command("show")
def show_command(
    call_id: Annotated[str, typer.Argument(help="The call's id (Retell's call_id).")],
    as_json: JsonOption = False,
    db: DbOption = None,
    agent: AgentFileOption = None,
) -> None:
    """One call turn by turn: what was said and cut off, models, tools, timings."""
    from callbrain.records.show import render_call

    call = _load(call_id, _database(db, agent))
    if as_json:
        _print_json(call)
    else:
        render_call(call, Console())


@calls_app.command("export")
def export_command(
    call_id: Annotated[str, typer.Argument(help="The call's id (Retell's call_id).")],
    script: Annotated[
        bool,
        typer.Option(
            "--script/--no-script",
            help="Replay the model's recorded answers (default), or let the agent's model answer.",
        ),
    ] = True,
    db: DbOption = None,
    agent: AgentFileOption = None,
) -> None:
    """Print a scenario replaying the caller's side of a call, for `callbrain test`."""
    from callbrain.records.export import export_scenario, scenario_yaml

    call = _load(call_id, _database(db, agent))
    typer.echo(scenario_yaml(export_scenario(call, script=script)), nl=False)


@calls_app.command("migrate")
def migrate_command(db: DbOption = None, agent: AgentFileOption = None) -> None:
    """Create or upgrade the records tables (the server does it at start-up unless
    server.records.migrate is false)."""
    from callbrain.records.database import migrate, open_engine

    url = _database(db, agent)

    async def run() -> str | None:
        engine = open_engine(url)
        try:
            return await migrate(engine)
        finally:
            await engine.dispose()

    try:
        before = asyncio.run(run())
    except Exception as exc:
        _fail(f"could not migrate {_shown(url)}: {exc}")
    done = f"{_shown(url)}: call records tables up to date (were at {before or 'none'})"
    _err.print(Text(done), highlight=False)


# ------------------------------------------------------------------ helpers


def _database(db: str | None, agent_file: Path | None) -> str:
    """The SQLAlchemy URL the options point at."""
    if db is not None and agent_file is not None:
        _fail("give --db or --agent, not both")
    if agent_file is not None:
        settings = settings_of(_load_agent(agent_file).server.records)
        if settings is None:
            _fail(f"{agent_file}: call records are off (server.records: false)")
        db = settings.url
    try:
        return database_url(db)
    except ValueError as exc:
        _fail(str(exc))


def _load_agent(path: Path) -> Any:
    from callbrain.agent import Agent
    from callbrain.errors import AgentConfigError

    try:
        return Agent.from_yaml(path)
    except AgentConfigError as exc:
        _fail(str(exc))


def _agent_name(path: Path) -> str:
    return str(_load_agent(path).name)


def _load(call_id: str, url: str) -> dict[str, Any]:
    from callbrain.records.read import load_call

    call = _read(url, lambda c: load_call(c, call_id))
    if call is None:
        _say_error(f"no call {call_id!r} in {_shown(url)}")
        raise typer.Exit(1)
    return call


def _read(url: str, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    from sqlalchemy.engine import make_url

    from callbrain.records.database import has_tables, open_engine

    parsed = make_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database and not Path(database).is_file():
        _fail(f"no call records at {database} (no call was recorded there yet)")

    async def run() -> T:
        engine = open_engine(url, for_reading=True)
        try:
            if not await has_tables(engine):
                _fail(f"no call records tables in {_shown(url)} (no server has written there)")
            async with engine.connect() as connection:
                return await query(connection)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:
        _fail(f"could not read {_shown(url)}: {exc}")


def _print_json(value: Any) -> None:
    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _fail(message: str) -> NoReturn:
    _say_error(message)
    raise typer.Exit(2)


def _say_error(message: str) -> None:
    # A Text, not markup: messages carry call ids and paths, which may hold "[".
    _err.print(Text.assemble(("error: ", "red"), message), highlight=False)
