"""Speculative generation on each turn: hit, miss or none, and the output wasted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as turns:
        turns.add_column(sa.Column("speculation", sa.String(8)))
        turns.add_column(
            sa.Column("speculation_wasted", sa.Integer, nullable=False, server_default="0")
        )
        turns.add_column(
            sa.Column("speculative_requests", sa.Integer, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("turns") as turns:
        turns.drop_column("speculative_requests")
        turns.drop_column("speculation_wasted")
        turns.drop_column("speculation")
