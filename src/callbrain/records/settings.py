"""The ``records:`` setting of an agent file's ``server:`` block, and where the
database is when nothing says.

Kept free of SQLAlchemy: every agent file is validated with it, recording on or off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Redaction = Literal["none", "pii", "all_text"]

DEFAULT_FILE_NAME = "calls.db"


class RecordsSettings(BaseModel):
    """Where call records go, for how long, and what of their text is kept.

    In the agent file: ``records: false`` turns recording off; ``records: true``
    (or no key) records to the default SQLite file; a mapping sets these fields.
    """

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    """``postgresql://user:password@host/db`` (needs the ``records`` extra),
    ``sqlite:///path/to/calls.db``, or a plain file path for SQLite. None: the
    default file, :func:`default_database_path`."""
    retention_days: float | None = Field(default=30, gt=0)
    """Calls that started longer ago are deleted (checked hourly). None: kept for ever."""
    redact: Redaction = "none"
    """``pii``: numbers of 3 digits or more, email addresses and names (from the
    call's variables and tool arguments with a name-like key) are replaced in the
    variables and every text; ``all_text``: every text is replaced by its length."""
    migrate: bool = True
    """Bring the database's tables up to date when the server starts. Off: the
    database must already be up to date (``callbrain calls migrate``)."""
    batch_size: int = Field(default=100, ge=1)
    """At most this many records (turns, call starts and ends) per write."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """Records wait at most about this long before they are written."""
    max_queue: int = Field(default=20_000, ge=1)
    """Records waiting to be written beyond this are dropped (and counted): a
    database that is down must not fill the memory."""
    write_timeout_s: float = Field(default=10.0, gt=0)
    """A write that takes longer is abandoned; its records are dropped and counted."""

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("is empty (is its ${ENV} variable set?); set it or remove the key")
        database_url(value)  # raises ValueError with the supported forms
        return value


def default_database_path() -> Path:
    """``$XDG_DATA_HOME/callbrain/calls.db``, by default ``~/.local/share/callbrain/calls.db``.

    The same place for ``callbrain serve`` and ``callbrain calls``, whatever the
    working directory, so the command line finds the server's records.
    """
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "callbrain" / DEFAULT_FILE_NAME


def database_url(url: str | None) -> str:
    """The SQLAlchemy URL, with the async driver, for what a user wrote.

    ``postgresql://`` and ``postgres://`` use asyncpg, ``sqlite://`` aiosqlite; a
    driver given explicitly (``postgresql+psycopg://``) is kept. Anything without
    ``://`` is a SQLite file path (``~`` expanded). None: the default file.
    """
    if url is None:
        return "sqlite+aiosqlite:///" + str(default_database_path())
    if "://" not in url:
        return "sqlite+aiosqlite:///" + str(Path(url).expanduser())
    scheme, rest = url.split("://", 1)
    dialect, _, driver = scheme.partition("+")
    if dialect in ("postgresql", "postgres"):
        return f"postgresql+{driver or 'asyncpg'}://{rest}"
    if dialect == "sqlite":
        return f"sqlite+{driver or 'aiosqlite'}://{rest}"
    raise ValueError(
        f"unsupported database {scheme!r}: use postgresql://..., sqlite:///path or a file path"
    )


def settings_of(records: RecordsSettings | bool) -> RecordsSettings | None:
    """The settings in force: None when recording is off."""
    if records is False:
        return None
    return RecordsSettings() if records is True else records
