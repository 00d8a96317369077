"""The call flight recorder: every call and turn in a database, and ``callbrain calls``.

* :mod:`.settings`: the ``server.records`` setting and the default database file;
* :mod:`.schema` and ``migrations/``: the tables, and Alembic's migrations for them;
* :mod:`.database`: opening the database, running the migrations;
* :mod:`.recorder`: the call observer that writes records in the background;
* :mod:`.rows` and :mod:`.redact`: a call's records as rows, redacted as asked;
* :mod:`.write` and :mod:`.read`: the SQL, one way in and one way out;
* :mod:`.export`: a recorded call as a scenario ``callbrain test`` replays;
* :mod:`.show` and :mod:`.cli`: the ``callbrain calls`` command.

Recording is on by default (SQLite, see
:func:`~callbrain.records.settings.default_database_path`); SQLAlchemy is imported
only when it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from callbrain.records.settings import RecordsSettings, settings_of

if TYPE_CHECKING:
    from callbrain.records.recorder import CallRecorder

__all__ = ["RecordsSettings", "open_recorder"]


def open_recorder(records: RecordsSettings | bool) -> CallRecorder | None:
    """The recorder for a ``server.records`` setting (None when it is off). A
    PostgreSQL URL without the ``records`` extra installed fails here."""
    settings = settings_of(records)
    if settings is None:
        return None
    from callbrain.records.recorder import CallRecorder

    return CallRecorder(settings)
