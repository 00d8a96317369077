"""Alembic's environment for the call records tables.

callbrain runs the migrations itself (:func:`callbrain.records.database.migrate`,
at start-up or with ``callbrain calls migrate``) on a connection it passes in
``config.attributes["connection"]``. A contributor adding a migration runs
Alembic against a scratch SQLite file instead::

    alembic -c src/callbrain/records/migrations/alembic.ini upgrade head
    alembic -c src/callbrain/records/migrations/alembic.ini revision --autogenerate -m "..."

(``-x url=...`` for another database than ``./scratch-calls.db``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from callbrain.records.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    _run(given)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or "sqlite:///scratch-calls.db"
    with create_engine(url).connect() as connection:
        _run(connection)
        connection.commit()
