"""Opening the records database, and bringing its tables up to date.

SQLite runs in WAL mode, so ``callbrain calls`` can read while the server
writes, with a busy timeout rather than an instant "database is locked".
PostgreSQL needs the ``records`` extra (asyncpg). Migrations are Alembic's,
shipped in ``migrations/``; on PostgreSQL they run under an advisory lock, so
several instances starting at once upgrade the tables once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from callbrain.extras import missing_extra

logger = logging.getLogger("callbrain.records")

MIGRATIONS = "callbrain.records:migrations"
_LOCK_KEY = 0x63616C6C  # "call": one advisory lock id for callbrain's migrations


class SchemaError(RuntimeError):
    """The database's tables are missing or older than this callbrain."""


def open_engine(url: str, *, for_reading: bool = False, busy_s: float = 5.0) -> AsyncEngine:
    """An async engine for a URL from :func:`~callbrain.records.settings.database_url`.

    ``for_reading``: no pool (the command line opens, reads and exits) and no
    directory made for a SQLite file that does not exist. ``busy_s``: how long
    SQLite waits for another writer's lock before it gives up.
    """
    parsed = make_url(url)
    options: dict[str, Any] = {"json_serializer": _json_dumps}
    if for_reading:
        options["poolclass"] = NullPool
    elif parsed.get_backend_name() == "postgresql":
        options.update(pool_size=2, max_overflow=2, pool_pre_ping=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not for_reading:
        # A directory that cannot be made is the database's failure like any
        # other: reported and counted by the recorder, never the server's end.
        with contextlib.suppress(OSError):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_async_engine(parsed, **options)
    except ImportError as exc:
        raise missing_extra("records", f"call records on {parsed.get_backend_name()}") from exc
    if parsed.get_backend_name() == "sqlite":
        pragmas = functools.partial(_sqlite_pragmas, busy_ms=round(busy_s * 1000))
        event.listen(engine.sync_engine, "connect", pragmas)
    return engine


def _sqlite_pragmas(connection: Any, _record: Any, *, busy_ms: int) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def migrate(engine: AsyncEngine) -> str | None:
    """Upgrade the tables to the newest revision; returns the revision it was at
    before (None: a new database)."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        return await connection.run_sync(_upgrade)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaError` unless the tables are at the newest revision."""
    async with engine.connect() as connection:
        current, head = await connection.run_sync(_revisions)
    if current != head:
        found = "no call records tables" if current is None else f"tables at revision {current}"
        raise SchemaError(
            f"it has {found}, this callbrain needs revision {head}: run `callbrain calls migrate`"
        )


async def has_tables(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda c: inspect(c).has_table("calls"))


def load_migrations() -> None:
    """Import Alembic ahead of time (it takes a quarter of a second)."""
    _quiet_alembic()
    import alembic.command
    import alembic.runtime.migration  # noqa: F401


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> str | None:
    _quiet_alembic()
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    before = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(_alembic_config(connection), "head")
    after = MigrationContext.configure(connection).get_current_revision()
    if after != before:
        logger.info("call records: database tables upgraded from %s to %s", before, after)
    return before


def _revisions(connection: Connection) -> tuple[str | None, str | None]:
    _quiet_alembic()
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
    return MigrationContext.configure(connection).get_current_revision(), head


def _quiet_alembic() -> None:
    """Alembic says "Context impl SQLiteImpl." at INFO on every start; unless
    someone set its level, keep it to warnings."""
    alembic_logger = logging.getLogger("alembic")
    if alembic_logger.level == logging.NOTSET:
        alembic_logger.setLevel(logging.WARNING)
