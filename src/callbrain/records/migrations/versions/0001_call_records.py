"""The call records: calls (one row per socket), turns, model requests, tool calls.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("call_id", sa.String(200), nullable=False),
        sa.Column("socket_number", sa.Integer, nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("end_reason", sa.String(16), nullable=False),
        sa.Column("variables", _JSON, nullable=False),
        sa.Column("tags", _JSON, nullable=False),
    )
    op.create_index("ix_calls_call_id", "calls", ["call_id"])
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_index("ix_calls_agent_started_at", "calls", ["agent", "started_at"])
    op.create_table(
        "turns",
        sa.Column("call_key", sa.String(32), primary_key=True),
        sa.Column("response_id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("at_ms", sa.Float, nullable=False),
        sa.Column("caller_text", sa.Text, nullable=False),
        sa.Column("spoken", sa.Text, nullable=False),
        sa.Column("action", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("llm_request_ms", sa.Float),
        sa.Column("first_token_ms", sa.Float),
        sa.Column("first_frame_ms", sa.Float),
        sa.Column("complete_ms", sa.Float),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.ForeignKeyConstraint(["call_key"], ["calls.id"], ondelete="CASCADE"),
    )
    op.create_table(
        "model_requests",
        sa.Column("call_key", sa.String(32), primary_key=True),
        sa.Column("response_id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("requested_ms", sa.Float, nullable=False),
        sa.Column("first_token_ms", sa.Float),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("failovers", _JSON, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(
            ["call_key", "response_id"],
            ["turns.call_key", "turns.response_id"],
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "tool_calls",
        sa.Column("call_key", sa.String(32), primary_key=True),
        sa.Column("response_id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("arguments", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("replayed", sa.Boolean, nullable=False),
        sa.Column("started_ms", sa.Float, nullable=False),
        sa.Column("duration_ms", sa.Float),
        sa.Column("action", sa.String(32)),
        sa.Column("result", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(
            ["call_key", "response_id"],
            ["turns.call_key", "turns.response_id"],
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("tool_calls")
    op.drop_table("model_requests")
    op.drop_table("turns")
    op.drop_index("ix_calls_agent_started_at", table_name="calls")
    op.drop_index("ix_calls_started_at", table_name="calls")
    op.drop_index("ix_calls_call_id", table_name="calls")
    op.drop_table("calls")
