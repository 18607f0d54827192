"""An API key's own limits ("virtual keys"): budget, models, requests and tokens per minute.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Four nullable columns on ``api_keys``: ``budget_micros`` (its own monthly cost budget, micro-USD),
``models`` (the models it may use, a JSON list; NULL: whatever its owner's tier allows),
``requests_per_minute`` and ``tokens_per_minute``. NULL is "no limit of the key's own", which is
what every existing key has, so adding them rewrites nothing; a key's expiry is the existing
``expires_at``. Downgrading drops them.

Self-contained on purpose, like 0001: nothing is imported from ``citadel.accounts``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("budget_micros", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("models", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True)
        )
        batch.add_column(sa.Column("requests_per_minute", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for column in ("tokens_per_minute", "requests_per_minute", "models", "budget_micros"):
            batch.drop_column(column)
