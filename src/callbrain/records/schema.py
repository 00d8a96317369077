"""The call records' tables (SQLAlchemy Core). Alembic's migrations in
``migrations/versions`` create them; a test checks the two agree.

One row in ``calls`` per socket of a call (a reconnect is a second row with the
same ``call_id`` and the next ``socket_number``), keyed by a random ``id`` made
when the socket opens, so rows of one batch can refer to each other without a
round trip. Turns, model requests and tool calls hang off it; their timings
are milliseconds from the turn's request (``*_ms``), or from the socket's
start for a turn's own ``at_ms``. Variables, tags and failovers are JSON.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

_JSON = JSON().with_variant(JSONB(), "postgresql")
_KEY = String(32)

calls = Table(
    "calls",
    metadata,
    Column("id", _KEY, primary_key=True),
    Column("call_id", String(200), nullable=False),
    Column("socket_number", Integer, nullable=False),
    Column("agent", String(200), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("end_reason", String(16), nullable=False),
    Column("variables", _JSON, nullable=False),
    Column("tags", _JSON, nullable=False),
    Index("ix_calls_call_id", "call_id"),
    Index("ix_calls_started_at", "started_at"),
    Index("ix_calls_agent_started_at", "agent", "started_at"),
)

turns = Table(
    "turns",
    metadata,
    Column("call_key", _KEY, primary_key=True),
    Column("response_id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("at_ms", Float, nullable=False),
    Column("caller_text", Text, nullable=False),
    Column("spoken", Text, nullable=False),
    Column("action", String(32)),
    Column("error", Text),
    Column("llm_request_ms", Float),
    Column("first_token_ms", Float),
    Column("first_frame_ms", Float),
    Column("complete_ms", Float),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("speculation", String(8)),
    Column("speculation_wasted", Integer, nullable=False, server_default="0"),
    Column("speculative_requests", Integer, nullable=False, server_default="0"),
    ForeignKeyConstraint(["call_key"], ["calls.id"], ondelete="CASCADE"),
)

model_requests = Table(
    "model_requests",
    metadata,
    Column("call_key", _KEY, primary_key=True),
    Column("response_id", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("provider", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("requested_ms", Float, nullable=False),
    Column("first_token_ms", Float),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("failovers", _JSON, nullable=False),
    Column("text", Text, nullable=False),
    ForeignKeyConstraint(
        ["call_key", "response_id"], ["turns.call_key", "turns.response_id"], ondelete="CASCADE"
    ),
)

tool_calls = Table(
    "tool_calls",
    metadata,
    Column("call_key", _KEY, primary_key=True),
    Column("response_id", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("arguments", Text, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("replayed", Boolean, nullable=False),
    Column("started_ms", Float, nullable=False),
    Column("duration_ms", Float),
    Column("action", String(32)),
    Column("result", Text, nullable=False),
    ForeignKeyConstraint(
        ["call_key", "response_id"], ["turns.call_key", "turns.response_id"], ondelete="CASCADE"
    ),
)

CHILDREN_FIRST = (tool_calls, model_requests, turns, calls)
"""Deletion order, for databases that do not cascade (SQLite without the pragma)."""
