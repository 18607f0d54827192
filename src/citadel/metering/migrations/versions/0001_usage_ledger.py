"""The usage ledger and its hourly and daily rollups.

Revision ID: m0001
Revises:
Create Date: 2024-06-10

Self-contained on purpose: a migration describes the tables as they were when it was written,
so it imports nothing from ``citadel.metering.schema``, which describes them as they are now.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "m0001"
down_revision = None
branch_labels = None
depends_on = None

_TIMESTAMP = sa.DateTime(timezone=True)
# Ids and names compared byte by byte on PostgreSQL: cheaper index inserts than a locale's rules.
_KEY = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
_ROLLUPS = ("usage_hourly", "usage_daily")


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("event_id", _KEY, nullable=False),
        sa.Column("ts", _TIMESTAMP, nullable=False),
        sa.Column("request_id", _KEY, nullable=False),
        sa.Column("user_id", _KEY, nullable=False),
        sa.Column("team_id", _KEY, nullable=False),
        sa.Column("key_id", _KEY, nullable=False),
        sa.Column("tier", _KEY, nullable=False),
        sa.Column("endpoint", _KEY, nullable=False),
        sa.Column("model", _KEY, nullable=False),
        sa.Column("deployment", _KEY, nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.REAL(), nullable=False),
        sa.Column("ttft_ms", sa.REAL(), nullable=True),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_usage_events"),
    )
    op.create_index("ix_usage_events_ts", "usage_events", ["ts"])
    op.create_index("ix_usage_events_team_id_ts", "usage_events", ["team_id", "ts"])
    op.create_index("ix_usage_events_user_id_ts", "usage_events", ["user_id", "ts"])
    for name in _ROLLUPS:
        op.create_table(
            name,
            sa.Column("bucket", _TIMESTAMP, nullable=False),
            sa.Column("user_id", _KEY, nullable=False),
            sa.Column("team_id", _KEY, nullable=False),
            sa.Column("model", _KEY, nullable=False),
            sa.Column("deployment", _KEY, nullable=False),
            sa.Column("tier", _KEY, nullable=False),
            sa.Column("requests", sa.BigInteger(), nullable=False),
            sa.Column("errors", sa.BigInteger(), nullable=False),
            sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
            sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
            sa.Column("cost_micros", sa.BigInteger(), nullable=False),
            sa.Column("latency_ms_sum", sa.Double(), nullable=False),
            sa.Column("ttft_ms_sum", sa.Double(), nullable=False),
            sa.Column("ttft_requests", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint(
                "bucket", "user_id", "team_id", "model", "deployment", "tier", name=f"pk_{name}"
            ),
        )
        if op.get_bind().dialect.name == "postgresql":
            # Rollup rows are updated over and over: room on the page keeps updates HOT.
            op.execute(f"ALTER TABLE {name} SET (fillfactor = 70)")


def downgrade() -> None:
    for name in reversed(_ROLLUPS):
        op.drop_table(name)
    op.drop_table("usage_events")
